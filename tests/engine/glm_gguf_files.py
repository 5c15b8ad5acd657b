"""chatglm GGUF files written the way llama.cpp's convert_hf_to_gguf.py (`ChatGLMModel`) writes them,
from a tiny THUDM checkpoint folder (glm_checkpoints.py) and its real tokenizer files.

    write_chatglm_gguf(tmp_path / "q8.gguf", folder, QType.Q8_0)

- metadata as `set_gguf_parameters`: context/embedding/feed-forward lengths, blocks, heads, KV heads,
  RMS eps, rope.dimension_count = (hidden / heads) / 2, rope.freq_base = 10000 * rope_ratio, no BOS;
- vocabulary as `set_vocab_chatglm3` (config `_name_or_path` THUDM/chatglm3-6b: SentencePiece pieces,
  scores and types, ids 0-2 renamed) or `set_vocab` (GLM-4: tiktoken ranks as byte-level BPE tokens),
  each padded with [PAD{id}] to padded_vocab_size, special ids by gguf's own `SpecialVocab`. GLM-4's
  merges are left out: gguf-py needs ~2 s to compute and ~1 s to parse them, and the loader never
  reads them (tiktoken's BPE follows from the ranks);
- tensors renamed by gguf-py's tensor map after dropping "transformer.", the RoPE buffer skipped;
  2-D weights in `qtype`, 1-D tensors (norms, biases) in F32 as the converter keeps them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import torch
from gguf import GGMLQuantizationType as QType
from gguf import TokenType
from safetensors import safe_open
from safetensors.torch import save_file
from tiktoken.load import load_tiktoken_bpe
from transformers.convert_slow_tokenizer import bytes_to_unicode

CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]  # fmt: skip


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
    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(path, "chatglm")
    _add_parameters(writer, config, qtype)
    if not with_vocab:
        writer.add_vocab_size(config["padded_vocab_size"])
    elif "THUDM/chatglm3-6b" in config.get("_name_or_path", ""):
        _add_chatglm3_vocab(writer, folder, config["padded_vocab_size"])
    else:
        _add_glm4_vocab(writer, folder, config["padded_vocab_size"])
    for key in drop_keys:
        del writer.kv_data[0][key]
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, config["num_layers"])
    for name, tensor in read_tensors(weights_folder or folder):
        if name.endswith(".rotary_pos_emb.inv_freq"):
            continue
        gguf_name = tensor_map.get_name(name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        _add_tensor(writer, gguf_name, tensor.float().numpy(), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_tensors(folder: Path) -> list[tuple[str, torch.Tensor]]:
    tensors = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors += [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118 (not a dict)
    return tensors


def _add_parameters(writer: gguf.GGUFWriter, config: dict, qtype: QType) -> None:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["seq_length"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["ffn_hidden_size"])
    writer.add_block_count(config["num_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["multi_query_group_num"])
    writer.add_layer_norm_rms_eps(config["layernorm_epsilon"])
    writer.add_file_type({QType.F32: 0, QType.F16: 1, QType.Q4_0: 2, QType.Q8_0: 7}[qtype])
    writer.add_rope_dimension_count(int(head_dim * 0.5))
    writer.add_add_bos_token(False)
    writer.add_rope_freq_base(10000 * config.get("rope_ratio", 1))


def _add_chatglm3_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
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


def _piece_type(sp: sentencepiece.SentencePieceProcessor, i: int) -> TokenType:
    for test, kind in [
        (sp.is_unknown, TokenType.UNKNOWN),
        (sp.is_control, TokenType.CONTROL),
        (sp.is_unused, TokenType.UNUSED),
        (sp.is_byte, TokenType.BYTE),
    ]:
        if test(i):
            return kind
    return TokenType.NORMAL


def _add_glm4_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
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


def _add_tensor(writer: gguf.GGUFWriter, name: str, weights: np.ndarray, qtype: QType) -> None:
    if weights.ndim == 1 or qtype == QType.F32:
        writer.add_tensor(name, weights)
    elif qtype == QType.F16:
        writer.add_tensor(name, weights.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)


def write_roundtrip_folder(folder: Path, out: Path, qtype: QType) -> Path:
    """A copy of a THUDM folder whose 2-D weights went through `qtype` and back to float32: the
    exact values a GGUF of that type holds, so its model must give the same logits."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {}
    for name, tensor in read_tensors(folder):
        weights = tensor.float().numpy()
        if weights.ndim == 2 and qtype == QType.F16:
            weights = weights.astype(np.float16)
        elif weights.ndim == 2 and qtype != QType.F32:
            weights = gguf.quants.dequantize(gguf.quants.quantize(weights, qtype), qtype)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    save_file(tensors, out / "model.safetensors")
    return out
