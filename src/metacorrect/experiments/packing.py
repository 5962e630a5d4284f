"""How a results database stores its JSON columns: compact, rounded, zlib-packed with a
shared dictionary.

A sweep's database is committed with its results, so its bytes matter: a Twitter POS grid
(396 runs, 23 classes) is ~1.7 MB stored naively. Per row, most of it is small JSON documents
(the run configuration, the resolved options, per-epoch metrics) whose keys repeat from run to
run, and T̂'s 529 floats. Compressing each row alone cannot see the repetition across rows, so
every packed column is compressed with a **preset dictionary** (``zlib``'s ``zdict``: the
compressor starts as if it had just read this text): typical keys and values of the documents
a run records. The zlib header of a packed value names its dictionary by the dictionary's
Adler-32 checksum, so :func:`load_json` needs nothing but the bytes, and values packed before
dictionaries existed (plain zlib) or written as plain JSON text read the same.

**Never edit a dictionary in** :data:`DICTIONARIES`: values packed with it could no longer be
read. To improve it, add a new one and point :data:`PACK_WITH` at it (a test pins the
checksums).

Rounding: floats are stored with the precision the values carry or need (``PACKED_COLUMNS``):
metrics are float32 (7 significant digits keep all of it), durations keep 4 (a tenth of a
millisecond on a second-long epoch); T̂ keeps 5 decimals (each entry
within 5e-6 of the learned value; T error is computed from the exact T̂ before storing and
kept at full precision in its own column, and the run folder keeps the exact ``T.npy``); the
true T keeps 12 significant digits (it is exact).
"""

from __future__ import annotations

import json
import zlib

# typical content of the packed documents, rarest first (zlib reaches the end of a dictionary
# most cheaply); frozen: see the module docstring
_ZDICT_V1 = (
    '{"python":"3.11.7","torch":"2.13.0+cpu","numpy":"2.4.6","metacorrect":"0.1.0",'
    '"platform":"Linux-6.18.44-x86_64-with-glibc2.36","git":"'
    '"twitter_pos","window_mlp","fashion-mnist","cifar10n","cifar10","cifar100","clothing1m","resnet","lenet",'
    '"word_avg","sgd","cosine","real:aggre","real:worse","forward_gold","trusted_only","confusion","distill",'
    '"l2rw","mwnet","forward","flip","none","cuda"'
    '{"amp": "none", "batch_size": 32, "channels_last": false, "data_dir": null, "dataset": "mnist", '
    '"device": "auto", "epochs": 10, "fused_optimizer": false, "init_weights": null, "keep_train_probs": 0, '
    '"label_set": null, "loader_workers": 0, "lr": 0.001, "method": "mlc", "method_options": {}, '
    '"model": "mlp", "model_options": {}, "momentum": 0.9, "nesterov": false, "noise": "uniform_mix", '
    '"optimizer": "adam", "scheduler": "none", "seed": 0, "strength": 0.0, "trusted": 0.01, '
    '"trusted_batch_size": null, "validation": 0.0, "weight_decay": 1e-06}'
    '{"dataset":"mnist","noise":"uniform_mix","strength":0.0,"trusted":0.01,"validation":0.0,"label_set":null,'
    '"method":"mlc","method_options":{"virtual_lr":0.1,"meta_lr":0.02,"t_update":"tested","t_blocks":100,'
    '"t_warmup":0.3,"z_crit":3.5,"trusted_ce":true,"trusted_weight":1.0,"t_init":"glc","estimate_epochs":1.0,'
    '"estimate_holdout":0.1,"estimate_patience":2,"t_space":"probs","normalise":"rows",'
    '"reset_each_step":false,"update_every":5,"meta_batch":null,"reuse_virtual_grad":false,"warmup_epochs":0,'
    '"meta_mode":"auto","meta_jvp":"auto","meta_scope":"all"},"model":"mlp","model_options":{},'
    '"optimizer":"adam","lr":0.001,"weight_decay":1e-06,"momentum":0.9,"nesterov":false,'
    '"fused_optimizer":false,"scheduler":"none","batch_size":32,"trusted_batch_size":null,"epochs":10,'
    '"seed":0,"device":"cpu","keep_train_probs":0,"loader_workers":0,"init_weights":null,"amp":"none",'
    '"channels_last":false,"problem":{"dataset":"mnist","noise":"uniform_mix","strength":0.0,"trusted":0.01,'
    '"validation":0.0,"seed":0,"n_noisy":59400,"n_trusted":600,"n_val":0},'
    '"seeds":{"split_and_noise":0,"torch":0,"noisy_loader":1,"trusted_loader":2}}'
    '{"method":"glc","dataset":"mnist","noise":"flip","strength":0.0,"trusted":0.01,"seed":0,'
    '"final_test_acc":0.9765,"final_val_acc":null,"t_error":0.06376380497898673,"wall_s":47.753392250000616,'
    '"cpu_s":46.82281201699999,"epochs":20,"fingerprint":"e0060a1f9aa679f3","world_size":1}'
    '[{"epoch":1,"phase":"estimate","phase_epoch":1,"train_loss":0.2646731,"epoch_s":2.907689,'
    '"test_acc":0.9512,"t_error":0.0661042},{"epoch":2,"phase":"corrected","phase_epoch":1,'
    '"train_loss":0.1557623,"epoch_s":3.265759,"test_acc":0.9765},{"epoch":3,"phase":"train",'
    '"phase_epoch":3,"train_loss":0.05646731,"epoch_s":2.907689,"test_acc":0.98},{"epoch":4,"phase":"mlc",'
    '"phase_epoch":4,"train_loss":0.05557623,"epoch_s":3.265759,"test_acc":0.9765,"t_error":0.0637638},'
    '[[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0],[0.00001,0.00002,0.00003,0.00004,0.00005,0.00006,0.00007,'
    '0.00008,0.00009,0.0001,0.0002,0.0003,0.0004,0.0005,0.0006,0.0007,0.0008,0.0009,0.001,0.002,0.003,'
    '0.004,0.005,0.006,0.007,0.008,0.009,0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.1,0.2,0.3,0.4,0.5,'
    '0.6,0.7,0.8,0.9,1.0],[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0],'
).encode()

DICTIONARIES = {zlib.adler32(_ZDICT_V1): _ZDICT_V1}
PACK_WITH = zlib.adler32(_ZDICT_V1)

# the packed columns, and how their floats are rounded: ("significant", n) digits,
# ("decimals", n) places, or ("metrics", n): n significant digits, durations (keys ending in
# "_s") 4; None: as recorded
PACKED_COLUMNS = {"config_json": None, "resolved_json": None, "versions_json": None, "final_json": None,
                  "epochs_json": ("metrics", 7), "T_hat_json": ("decimals", 5),
                  "T_true_json": ("significant", 12)}
DURATION_DIGITS = 4


def _map_floats(value, fn):
    """``value`` with ``fn`` applied to every float, in nested lists and dicts."""
    if isinstance(value, float):
        return fn(value)
    if isinstance(value, list):
        return [_map_floats(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_floats(v, fn) for k, v in value.items()}
    return value


def rounded(value, digits: int):
    """Floats rounded to ``digits`` significant digits, in nested lists and dicts."""
    return _map_floats(value, lambda x: float(f"{x:.{digits}g}"))


def rounded_decimals(value, places: int):
    """Floats rounded to ``places`` decimal places (``-0.0`` as ``0.0``), in nested lists and dicts."""
    return _map_floats(value, lambda x: round(x, places) + 0.0)


def json_default(o):
    """``json.dumps``'s fallback for the values a run records: NumPy arrays and scalars as
    plain JSON, anything else as its string."""
    import numpy as np
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def compact_json(value) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def _round(value, rounding):
    if rounding is None:
        return value
    kind, n = rounding
    if kind == "significant":
        return rounded(value, n)
    if kind == "decimals":
        return rounded_decimals(value, n)
    # "metrics": a list of per-epoch records, durations to DURATION_DIGITS
    return [{k: rounded(v, DURATION_DIGITS if k.endswith("_s") else n) for k, v in e.items()}
            if isinstance(e, dict) else rounded(e, n) for e in value] if isinstance(value, list) else rounded(value, n)


def pack_json(value, rounding: tuple[str, int] | None = None) -> bytes | None:
    """``value`` as compact JSON (floats rounded as ``rounding`` says), zlib-compressed with
    the current dictionary; ``None`` stays ``None``. A string holding JSON (as older versions
    recorded the versions column) is packed as the value it holds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, DICTIONARIES[PACK_WITH])
    return packer.compress(compact_json(_round(value, rounding)).encode()) + packer.flush()


def pack_columns(values: dict) -> dict:
    """``values`` (column → value) with the ``PACKED_COLUMNS`` among them packed."""
    return {c: pack_json(v, PACKED_COLUMNS[c]) if c in PACKED_COLUMNS else v for c, v in values.items()}


def load_json(stored):
    """The value of a JSON column: plain JSON text, or JSON packed by :func:`pack_json` (with
    or without a dictionary)."""
    if stored is None:
        return None
    if not isinstance(stored, (bytes, bytearray, memoryview)):
        return json.loads(stored)
    stored = bytes(stored)
    if len(stored) >= 6 and stored[1] & 0x20:  # FDICT: the dictionary's Adler-32 follows the header
        dict_id = int.from_bytes(stored[2:6], "big")
        if dict_id not in DICTIONARIES:
            raise ValueError(f"a packed value names zlib dictionary {dict_id:#010x}, which this version of "
                             f"metacorrect does not know (known: "
                             f"{', '.join(f'{d:#010x}' for d in DICTIONARIES)}); it was written by a newer version")
        unpacker = zlib.decompressobj(zdict=DICTIONARIES[dict_id])
        return json.loads(unpacker.decompress(stored) + unpacker.flush())
    return json.loads(zlib.decompress(stored))


__all__ = ["DICTIONARIES", "PACKED_COLUMNS", "PACK_WITH", "compact_json", "json_default", "load_json",
           "pack_columns", "pack_json", "rounded", "rounded_decimals"]
