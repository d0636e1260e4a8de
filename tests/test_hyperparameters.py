"""Hyperparameters: the product description's defaults, documented ranges, clear errors."""

from __future__ import annotations

import pytest

from tuneforge.api.common.v1 import common_pb2
from tuneforge.core import hyperparameters as hp

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj")


def resolve(**given):
    return hp.resolve(given, available_modules=MODULES, default_modules=DEFAULT)


def test_defaults_are_the_product_descriptions():
    r = resolve()
    assert (r.learning_rate, r.lr_peak_ratio, r.warmup_ratio) == (1e-4, 0.0, 0.0)
    assert (r.min_examples, r.test_fraction, r.n_evals, r.max_epochs) == (200, 0.1, 20, 20)
    assert (r.n_checkpoints, r.batch_size) == (1, 8)
    assert (r.lora_rank, r.lora_alpha, r.lora_dropout) == (8, 8.0, 0.1)
    assert r.lora_target_modules == DEFAULT
    assert r.train_on_inputs == "auto"


@pytest.mark.parametrize(
    "field,value",
    [
        ("learning_rate", 0), ("learning_rate", 0.5), ("lr_peak_ratio", -0.1), ("lr_peak_ratio", 1.5),
        ("warmup_ratio", 1.0), ("min_examples", 0), ("test_fraction", 0), ("test_fraction", 0.6),
        ("n_evals", -1), ("max_epochs", 0), ("max_epochs", 101), ("n_checkpoints", 0), ("batch_size", 0),
        ("lora_rank", 0), ("lora_alpha", 0), ("lora_dropout", 0.95), ("batch_size", 2.5),
    ],
)
def test_out_of_range_names_field_and_range(field, value):
    with pytest.raises(hp.HyperparameterError) as info:
        resolve(**{field: value})
    (violation,) = info.value.violations
    assert violation.field == field
    assert "must be" in violation.description


def test_all_errors_reported_at_once():
    with pytest.raises(hp.HyperparameterError) as info:
        resolve(learning_rate=5, batch_size=0, lora_target_modules=("q_proj", "nope"), train_on_inputs="maybe")
    fields = [v.field for v in info.value.violations]
    assert fields == ["learning_rate", "batch_size", "lora_target_modules", "train_on_inputs"]
    assert "nope" in info.value.violations[2].description


def test_proto_round_trip_keeps_unset_as_default():
    msg = common_pb2.Hyperparameters(learning_rate=3e-4, max_epochs=4)
    given = hp.from_proto(msg)
    assert given == {"learning_rate": 3e-4, "max_epochs": 4}
    r = resolve(**given)
    full = hp.to_proto(r)
    assert full.HasField("n_evals") and full.n_evals == 20
    assert resolve(**hp.from_proto(full)) == r


def test_learning_rate_schedule_shapes():
    m = hp.learning_rate_multiplier
    # ratio 0, no warmup: constant
    assert [m(s, 10, 0.0, 0.0) for s in range(10)] == [1.0] * 10
    # ratio 0, warmup 20%: rises from near zero, then constant
    w = [m(s, 10, 0.2, 0.0) for s in range(10)]
    assert w[0] < w[1] < 1.0 and w[2:] == [1.0] * 8
    # ratio r: starts at r, peaks after warmup, cosine back to r at the last step
    r = [m(s, 11, 0.1, 0.1) for s in range(11)]
    assert r[0] == pytest.approx(0.1)
    assert max(r) == pytest.approx(1.0)
    assert r[-1] == pytest.approx(0.1)
    peak = r.index(max(r))
    assert all(a >= b for a, b in zip(r[peak:], r[peak + 1:]))
