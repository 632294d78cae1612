"""api/jsonfast.py: the service's orjson provider answers what Flask's standard provider answers."""
import datetime
import decimal
import json

import numpy as np
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from api.jsonfast import OrjsonProvider

VALUES = [
    {"query": {"id": 3, "key": "a/b.png"}, "results": [{"id": 7, "distance": 0.125, "attributes": {"Male": 1}}]},
    {0: "pose", 5: None},                      # chunk names keyed by number
    {"é": "naïve ✓", "nested": [1, 2.5, None, True]},
    datetime.date(2026, 12, 1),
    decimal.Decimal("1.50"),                   # orjson has no Decimal: the fallback encodes it
    2**70,                                     # nor integers past 64 bits
]


def test_the_same_json_as_the_standard_provider():
    app = Flask(__name__)
    fast, standard = OrjsonProvider(app), DefaultJSONProvider(app)
    for value in VALUES:
        assert json.loads(fast.dumps(value)) == json.loads(standard.dumps(value))
    assert json.loads(fast.dumps({"ids": np.arange(3), "n": np.int64(4)})) == {"ids": [0, 1, 2], "n": 4}


def test_responses_keep_field_order_and_type():
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    with app.app_context():
        response = app.json.response({"z": 1, "a": 2})
    assert response.mimetype == "application/json"
    assert list(json.loads(response.get_data())) == ["z", "a"]
    assert app.json.loads(b'{"x": [1]}') == {"x": [1]}
