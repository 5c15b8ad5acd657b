"""chatglm GGUF files written the way llama.cpp's convert_hf_to_gguf.py (`ChatGLMModel`) writes them,
from a THUDM checkpoint folder (e.g. random_checkpoint's) and its real tokenizer files, one tensor
at a time (a 6B model is converted without holding it):

    python -m glmserve.devtools.chatglm_gguf FOLDER OUT.gguf --type Q4_0

- metadata as `set_gguf_parameters`: context/embedding/feed-forward lengths, blocks, heads, KV heads,
  RMS eps, rope.dimension_count = (hidden / heads) / 2, rope.freq_base = 10000 * rope_ratio, no BOS;
- vocabulary as `set_vocab_chatglm3` (config `_name_or_path` THUDM/chatglm3-6b: SentencePiece pieces,
  scores and types, ids 0-2 renamed) or `set_vocab` (GLM-4: tiktoken ranks as byte-level BPE tokens),
  each padded with [PAD{id}] to padded_vocab_size, special ids by gguf's own `SpecialVocab`. GLM-4's
  merges are left out: gguf-py needs ~2 s to compute and ~1 s to parse them, and glmserve never
  reads them (tiktoken's BPE follows from the ranks);
- tensors renamed by gguf-py's tensor map after dropping "transformer.", the RoPE buffer skipped;
  2-D weights in `qtype` (gguf-py's reference quantizers), 1-D tensors (norms, biases) in F32 as
  the converter keeps them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import TokenType
from safetensors import safe_open

CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]  # fmt: skip
FILE_TYPES = {QType.F32: 0, QType.F16: 1, QType.Q4_0: 2, QType.Q8_0: 7}


def write_chatglm_gguf(
    path: Path,
    folder: Path,
    qtype: QType = QType.F32,
    *,
    weights_folder: Path | None = None,
    with_vocab: bool = True,
    drop_keys: tuple[str, ...] = (),
) -> Path:
    """`folder`: THUDM config.json + tokenizer files; tensors from `weights_folder` (default the same;
    a transformers-layout folder gives split attn_q/k/v). Without vocab, `chatglm.vocab_size` stands
    in for the token list (weights-only tests). `drop_keys` are left out of the metadata."""
    config = json.loads((Path(folder) / "config.json").read_text())
    writer = gguf.GGUFWriter(path, "chatglm")
    _add_parameters(writer, config, qtype)
    if not with_vocab:
        writer.add_vocab_size(config["padded_vocab_size"])
    elif "THUDM/chatglm3-6b" in config.get("_name_or_path", ""):
        _add_chatglm3_vocab(writer, Path(folder), config["padded_vocab_size"])
    else:
        _add_glm4_vocab(writer, Path(folder), config["padded_vocab_size"])
    for key in drop_keys:
        del writer.kv_data[0][key]
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, config["num_layers"])
    names = {}
    for name, shape in tensor_shapes(weights_folder or folder):
        if not name.endswith(".rotary_pos_emb.inv_freq"):
            names[name] = tensor_map.get_name(name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
            stored_type = qtype if len(shape) == 2 else QType.F32
            _add_tensor_info(writer, names[name], shape, stored_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, weights in read_tensors(weights_folder or folder):
        if name in names:
            writer.write_tensor_data(_stored(weights, qtype))
    writer.close()
    return Path(path)


def tensor_shapes(folder: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for name in f.keys():  # noqa: SIM118 (not a dict)
                yield name, tuple(f.get_slice(name).get_shape())


def read_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """float32 tensors, one at a time, in the order tensor_shapes lists them."""
    import torch  # bfloat16 safetensors: numpy has no such dtype

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def _add_tensor_info(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype: QType) -> None:
    if qtype in (QType.F32, QType.F16):
        dtype = np.float32 if qtype == QType.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def _stored(weights: np.ndarray, qtype: QType) -> np.ndarray:
    if weights.ndim == 1 or qtype == QType.F32:
        return weights
    if qtype == QType.F16:
        return weights.astype(np.float16)
    return gguf.quants.quantize(weights, qtype)


def _add_parameters(writer: gguf.GGUFWriter, config: dict, qtype: QType) -> None:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["seq_length"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["ffn_hidden_size"])
    writer.add_block_count(config["num_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["multi_query_group_num"])
    writer.add_layer_norm_rms_eps(config["layernorm_epsilon"])
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_rope_dimension_count(int(head_dim * 0.5))
    writer.add_add_bos_token(False)
    writer.add_rope_freq_base(10000 * config.get("rope_ratio", 1))


def _add_chatglm3_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    num_pieces = sp.vocab_size()
    renamed = {0: "<unk>", 1: "<bos>", 2: "<eos>"}  # THUDM's tokenizer gives "" for them
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i < num_pieces:
            tokens.append(renamed.get(i, sp.id_to_piece(i)))
            scores.append(sp.get_score(i))
            types.append(_piece_type(sp, i))
        elif i - num_pieces < len(CHATGLM3_SPECIALS):
            tokens.append(CHATGLM3_SPECIALS[i - num_pieces])
            scores.append(0.0)
            types.append(TokenType.CONTROL)
        else:
            tokens.append(f"[PAD{i}]")
            scores.append(0.0)
            types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _piece_type(sp, i: int) -> TokenType:
    for test, kind in [
        (sp.is_unknown, TokenType.UNKNOWN),
        (sp.is_control, TokenType.CONTROL),
        (sp.is_unused, TokenType.UNUSED),
        (sp.is_byte, TokenType.BYTE),
    ]:
        if test(i):
            return kind
    return TokenType.NORMAL


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies write tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(printable, map(chr, printable), strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def _add_glm4_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    from tiktoken.load import load_tiktoken_bpe

    byte_encoder = bytes_to_unicode()
    ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
    added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    by_id = {rank: "".join(byte_encoder[b] for b in token) for token, rank in ranks.items()}
    by_id |= {int(i): entry["content"] for i, entry in added.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    rank_ids = set(ranks.values())
    types = [
        TokenType.NORMAL if i in rank_ids
        else (TokenType.CONTROL if added[str(i)]["special"] else TokenType.USER_DEFINED) if str(i) in added
        else TokenType.UNUSED
        for i in range(vocab_size)
    ]  # fmt: skip
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=False)
    special_vocab._set_special_token("eos", tokens.index("<|endoftext|>"))
    special_vocab._set_special_token("eot", tokens.index("<|user|>"))
    special_vocab._set_special_token("unk", tokens.index("<|endoftext|>"))
    special_vocab.add_to_gguf(writer, quiet=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glmserve.devtools.chatglm_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("folder", type=Path, help="THUDM checkpoint folder (safetensors)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="Q4_0", choices=[t.name for t in FILE_TYPES])
    args = parser.parse_args(argv)
    print(f"wrote {write_chatglm_gguf(args.out, args.folder, QType[args.type])}")


if __name__ == "__main__":
    main()
