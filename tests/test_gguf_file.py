"""gguf_file.py: our one-pass GGUF header reader against gguf-py's GGUFReader."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from glmserve.gguf_file import parse_gguf


def reference(path):
    reader = gguf.GGUFReader(path)
    # GGUF.version / tensor_count / kv_count are header fields gguf-py adds, not metadata.
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, reader.tensors


def assert_same_as_gguf_py(path):
    ours = parse_gguf(path)
    fields, tensors = reference(path)
    assert ours.fields == fields
    assert [t.name for t in ours.tensors] == [t.name for t in tensors]
    for mine, theirs in zip(ours.tensors, tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(theirs.shape.tolist())
        assert (mine.n_elements, mine.n_bytes) == (theirs.n_elements, theirs.n_bytes)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert np.array_equal(mine.data, theirs.data)


def test_bundled_model_reads_as_gguf_py_reads_it(bundled_gguf):
    assert_same_as_gguf_py(bundled_gguf)


def write_all_types(path, alignment: int | None = None):
    writer = gguf.GGUFWriter(path, "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**63)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo <|user|> 你好")
    writer.add_array("t.strings", ["a", "", "ĠHello", "<0xE4>", "中文"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_array("t.empty", [])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    q8 = gguf.quants.quantize(
        np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind_reads_as_gguf_py(tmp_path, alignment):
    path = tmp_path / "all.gguf"
    write_all_types(path, alignment)
    assert_same_as_gguf_py(path)
    fields = parse_gguf(path).fields
    assert fields["t.strings"] == ["a", "", "ĠHello", "<0xE4>", "中文"] and fields["t.bool"] is True


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "all.gguf"
    write_all_types(path)
    data = path.read_bytes()
    for cut in (
        20,
        200,
        len(data) - 64,
    ):  # inside the header, the metadata, the last tensor (136 bytes + < 32 padding)
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf"):
            parse_gguf(tmp_path / "cut.gguf")


def test_other_versions_and_byte_orders_are_refused_by_name(tmp_path):
    path = tmp_path / "all.gguf"
    write_all_types(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack(">I", 3)  # a big-endian file's version field read little-endian
    (tmp_path / "be.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="big-endian"):
        parse_gguf(tmp_path / "be.gguf")
    data[4:8] = struct.pack("<I", 1)
    (tmp_path / "v1.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 1"):
        parse_gguf(tmp_path / "v1.gguf")
