"""safetensors interoperability against the reference implementation (the PyPI `safetensors` package).

- Files written by Python are read by `mxlm inspect --json` with the same names, dtypes, shapes and offsets.
- `mxlm inspect --resave-to` re-writes a checkpoint through mxlm's writer: the result must be byte-identical
  to what Python wrote (same header layout, order and padding), and Python must read every tensor back.
- Sharded output (model-0000i-of-0000N + index) is read back by Python shard by shard.
- Malformed files: mxlm rejects exactly the files the reference rejects (for the dtypes both know).
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import TensorSpec, deserialize, serialize_file

MXLM = os.environ.get("MXLM_BIN", "mxlm")

# safetensors-Python dtype name -> (header dtype, element size)
DTYPES = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}


def run_mxlm(*args, check=True):
    result = subprocess.run([MXLM, *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"mxlm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def make_tensors(seed):
    """Random tensors of every dtype (raw bytes, so BF16 and FP8 need no torch), awkward names included."""
    rng = np.random.default_rng(seed)
    tensors = {}
    names = ["model.layers.0.mlp.experts.7.w1.weight", "ünïcødé.weight", 'quote"and\\backslash', "scalar", "empty"]
    for i, dtype in enumerate(DTYPES):
        names.append(f"t.{rng.integers(0, 1000)}.{dtype}")
    for i, name in enumerate(names):
        dtype = list(DTYPES)[i % len(DTYPES)]
        if name == "scalar":
            shape = ()
        elif name == "empty":
            shape = (0, 3)
        else:
            shape = tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(1, 4)))
        size = DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64))
        data = rng.integers(0, 256, size=size, dtype=np.uint8)
        if dtype == "bool":
            data = data % 2
        tensors[name] = (dtype, shape, data)
    return tensors


def write_python(path, tensors, metadata):
    specs = {
        name: TensorSpec(dtype=dtype, shape=shape, data_ptr=data.ctypes.data, data_len=data.nbytes)
        for name, (dtype, shape, data) in tensors.items()
    }
    serialize_file(specs, str(path), metadata=metadata)


def read_python(path):
    """name -> (header dtype, shape, bytes), through the reference deserializer."""
    return {
        name: (info["dtype"], list(info["shape"]), bytes(info["data"]))
        for name, info in deserialize(Path(path).read_bytes())
    }


def header_of(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_python_written_file_read_by_mxlm(tmp_path, seed):
    tensors = make_tensors(seed)
    write_python(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    report = json.loads(run_mxlm("inspect", tmp_path, "--json").stdout)
    header = header_of(tmp_path / "model.safetensors")

    assert report["num_tensors"] == len(tensors)
    assert report["metadata"] == {"format": "pt"}
    by_name = {t["name"]: t for t in report["tensors"]}
    assert set(by_name) == set(tensors)
    for name, (dtype, shape, data) in tensors.items():
        ours = by_name[name]
        assert ours["dtype"] == DTYPES[dtype][0] == header[name]["dtype"]
        assert ours["shape"] == list(shape) == header[name]["shape"]
        assert ours["data_offsets"] == header[name]["data_offsets"]
        assert ours["file"] == "model.safetensors"
    totals = {}
    for dtype, shape, data in tensors.values():
        entry = totals.setdefault(DTYPES[dtype][0], {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += data.nbytes
    assert report["dtypes"] == totals
    assert report["total_bytes"] == sum(d.nbytes for _, _, d in tensors.values())


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": "np"}])
def test_mxlm_writer_is_byte_identical_to_python(tmp_path, metadata):
    tensors = make_tensors(7)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write_python(src / "model.safetensors", tensors, metadata)
    run_mxlm("inspect", src, "--resave-to", dst)
    ours = (dst / "model.safetensors").read_bytes()
    theirs = (src / "model.safetensors").read_bytes()
    assert ours[:8] == theirs[:8], "header length differs"
    assert ours == theirs
    assert not list(dst.glob("*.partial"))
    back = read_python(dst / "model.safetensors")
    for name, (dtype, shape, data) in tensors.items():
        assert back[name] == (DTYPES[dtype][0], list(shape), data.tobytes())


def test_mxlm_sharded_output_read_by_python(tmp_path):
    tensors = make_tensors(11)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write_python(src / "model.safetensors", tensors, {"format": "pt"})
    run_mxlm("inspect", src, "--resave-to", dst, "--max-shard-size", "100B")

    index_text = (dst / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    # transformers writes json.dumps(index, indent=2, sort_keys=True) + "\n"; so must we.
    assert index_text == json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert index["metadata"]["total_size"] == sum(d.nbytes for _, _, d in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    seen = {}
    for shard in shards:
        for name, value in read_python(dst / shard).items():
            assert index["weight_map"][name] == shard
            seen[name] = value
    for name, (dtype, shape, data) in tensors.items():
        assert seen[name] == (DTYPES[dtype][0], list(shape), data.tobytes())
    # And the sharded directory reads back through mxlm too.
    report = json.loads(run_mxlm("inspect", dst, "--json").stdout)
    assert report["num_files"] == len(shards)
    assert {t["name"]: t["file"] for t in report["tensors"]} == index["weight_map"]


def test_python_sharded_checkpoint_read_by_mxlm(tmp_path):
    tensors = make_tensors(5)
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_python(tmp_path / file, {n: tensors[n] for n in part}, {"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(d.nbytes for _, _, d in tensors.values())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )
    report = json.loads(run_mxlm("inspect", tmp_path, "--json").stdout)
    assert report["num_files"] == 2
    assert {t["name"]: t["file"] for t in report["tensors"]} == weight_map
    assert report["total_bytes"] == total

    # A tensor the index lists but the shard lacks, and a missing shard: clear errors from mxlm.
    weight_map_bad = dict(weight_map, ghost="model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map_bad}))
    result = run_mxlm("inspect", tmp_path, check=False)
    assert result.returncode != 0 and "ghost" in result.stderr
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    result = run_mxlm("inspect", tmp_path, check=False)
    assert result.returncode != 0 and "model-00002-of-00002.safetensors" in result.stderr


def raw_file(header, data, declared=None):
    h = header.encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + data


F32_2 = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
AGREEMENT_CASES = {
    "valid": raw_file(F32_2, b"x" * 8),
    "valid_leading_space": raw_file(" " + F32_2, b"x" * 8),
    "valid_extra_field": raw_file('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"foo":1}}', b"x" * 8),
    "valid_empty": raw_file("{}", b""),
    "valid_padded": raw_file(F32_2 + "   ", b"x" * 8),
    "truncated": raw_file(F32_2, b"x" * 5),
    "trailing_bytes": raw_file(F32_2, b"x" * 12),
    "gap": raw_file(
        '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}',
        b"x" * 8,
    ),
    "overlap": raw_file(
        '{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
        b"x" * 8,
    ),
    "duplicate": raw_file(
        '{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
        b"x" * 8,
    ),
    "unknown_dtype": raw_file('{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}', b"x" * 8),
    "shape_mismatch": raw_file('{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}}', b"x" * 8),
    "metadata_not_string": raw_file('{"__metadata__":{"a":1}}', b""),
    "shape_float": raw_file('{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"x" * 8),
    "negative_offset": raw_file('{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', b"x" * 8),
    "empty_header": raw_file("", b""),
    "not_object": raw_file("[]", b""),
    "not_json": raw_file('{"w":', b""),
    "length_past_end": raw_file("{}", b"", declared=1000),
    "length_over_limit": raw_file("{}", b"", declared=200_000_000),
    "empty_object_trailing": raw_file("{}", b"abc"),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_accepts_and_rejects_what_the_reference_does(tmp_path, case):
    raw = AGREEMENT_CASES[case]
    try:
        deserialize(raw)
        reference_ok = True
    except Exception:
        reference_ok = False
    assert reference_ok == case.startswith("valid"), "the reference changed its mind; update the case name"
    (tmp_path / "model.safetensors").write_bytes(raw)
    result = run_mxlm("inspect", tmp_path, "--json", check=False)
    assert (result.returncode == 0) == reference_ok, result.stderr
    if not reference_ok:
        assert "model.safetensors" in result.stderr
        assert "Traceback" not in result.stderr and "terminate" not in result.stderr
