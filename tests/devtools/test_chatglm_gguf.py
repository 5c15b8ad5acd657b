"""The chatglm GGUF writer of the tests and benchmarks, as a command: it streams a random ChatGLM3
folder into a Q4_0 file that glmserve loads with the folder's tokenizer and config."""


from transformers.convert_slow_tokenizer import bytes_to_unicode as transformers_bytes_to_unicode

from glmserve.devtools.chatglm_gguf import bytes_to_unicode, main
from glmserve.devtools.random_checkpoint import main as random_checkpoint
from glmserve.engine.checkpoint import open_checkpoint
from glmserve.tokenization import load_tokenizer


def test_bytes_to_unicode_is_gpt2s():
    assert bytes_to_unicode() == transformers_bytes_to_unicode()


def test_command_writes_a_q4_0_file_that_loads(tmp_path, capsys):
    folder = tmp_path / "chatglm3"
    sizes = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--multi-query-group-num", "2",
             "--kv-channels", "16", "--ffn-hidden-size", "96", "--dtype", "float32"]  # fmt: skip
    random_checkpoint(["--config", "chatglm3-6b", "--out", str(folder), *sizes])
    main([str(folder), str(tmp_path / "m.gguf"), "--type", "Q4_0"])
    assert "wrote" in capsys.readouterr().out
    checkpoint = open_checkpoint(tmp_path / "m.gguf")
    assert checkpoint.config.num_hidden_layers == 1 and checkpoint.config.hidden_size == 64
    gguf_ids = load_tokenizer(tmp_path / "m.gguf").encode("你好")
    assert gguf_ids == load_tokenizer(folder).encode("你好")
