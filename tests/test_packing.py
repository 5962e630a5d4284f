"""How the results database packs its JSON columns (metacorrect.experiments.packing)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from metacorrect.experiments.packing import (DICTIONARIES, PACK_WITH, PACKED_COLUMNS, load_json, pack_columns,
                                             pack_json)

# the checksums of the dictionaries values were packed with: a dictionary must never change
# (packed values could no longer be read); add a new one instead
FROZEN = {0x6659BECD}


def test_dictionaries_are_frozen():
    assert set(DICTIONARIES) >= FROZEN, "a zlib dictionary changed: add a new one, never edit one in use"
    assert all(zlib.adler32(d) == k for k, d in DICTIONARIES.items()) and PACK_WITH in DICTIONARIES


def test_packed_values_name_their_dictionary_and_read_back():
    value = {"dataset": "mnist", "method_options": {"update_every": 5}, "lr": 0.001, "none": None}
    packed = pack_json(value)
    assert packed[1] & 0x20 and int.from_bytes(packed[2:6], "big") == PACK_WITH  # FDICT and its Adler-32
    assert load_json(packed) == value
    # what older versions stored reads the same: plain JSON text, zlib without a dictionary
    assert load_json(json.dumps(value)) == value and load_json(zlib.compress(json.dumps(value).encode())) == value
    assert load_json(None) is None and pack_json(None) is None
    # a JSON string (older versions' versions column) packs as the value it holds
    assert load_json(pack_json(json.dumps(value))) == value


def test_the_dictionary_earns_its_place_on_a_typical_configuration():
    config = {"amp": "none", "batch_size": 64, "dataset": "twitter_pos", "epochs": 15, "lr": 0.001,
              "method": "glc", "method_options": {}, "model": "window_mlp", "noise": "flip", "optimizer": "adam",
              "scheduler": "none", "seed": 2, "strength": 0.4, "trusted": 0.05, "validation": 0.0,
              "weight_decay": 5e-05}
    plain = zlib.compress(json.dumps(config, separators=(",", ":")).encode(), 9)
    assert len(pack_json(config)) < 0.7 * len(plain)


def test_rounding_keeps_the_precision_each_column_needs():
    rng = np.random.default_rng(0)
    T = rng.dirichlet(np.ones(23), size=23)
    stored = np.array(load_json(pack_columns({"T_hat_json": T.tolist()})["T_hat_json"]))
    assert np.abs(stored - T).max() <= 5e-6 + 1e-12  # 5 decimals
    # the mean row L1 error (the T error the reports show at 3 decimals) moves by < 23 * 5e-6
    assert abs(np.abs(stored - np.eye(23)).sum(1).mean() - np.abs(T - np.eye(23)).sum(1).mean()) < 23 * 5e-6
    true_T = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2 / 22, 1 - 0.2 / 22, 0.0]]
    stored_true = np.array(load_json(pack_columns({"T_true_json": true_T})["T_true_json"]))
    np.testing.assert_allclose(stored_true, true_T, rtol=1e-11, atol=0)  # 12 significant digits
    epochs = [{"epoch": 3, "train_loss": 0.123456789, "epoch_s": 12.3456789, "phase": "mlc"}]
    assert load_json(pack_columns({"epochs_json": epochs})["epochs_json"]) == [
        {"epoch": 3, "train_loss": 0.1234568, "epoch_s": 12.35, "phase": "mlc"}]
    assert set(PACKED_COLUMNS) >= {"config_json", "resolved_json", "versions_json", "T_hat_json"}
    assert pack_columns({"status": "done"}) == {"status": "done"}  # other columns as they are


def test_a_value_packed_with_an_unknown_dictionary_is_a_clear_error():
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, b"some other dictionary")
    packed = packer.compress(b"{}") + packer.flush()
    with pytest.raises(ValueError, match="does not know.*newer version"):
        load_json(packed)
