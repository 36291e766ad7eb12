"""Hugging Face models and SST-2 (optional extra ``fwdgrad[hf]``): a tiny BERT folder, tokenizer and TSV files
are built here (nothing is downloaded); skipped when ``transformers`` is missing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad.derivatives.attention import forward_mode_attention
from fwdgrad.models import build_model

transformers = pytest.importorskip("transformers")

from fwdgrad.data.glue import load_sst2, read_sst2_tsv  # noqa: E402
from fwdgrad.models.hf import HFClassifier, load_hf_model  # noqa: E402

WORDS = ["good", "bad", "great", "awful", "movie", "film", "fun", "boring", "a", "the", "very", "not"]
SENTENCES = [("a good movie", 1), ("a bad film", 0), ("very fun", 1), ("not fun", 0), ("the awful movie", 0),
             ("great film", 1), ("boring", 0), ("very good film", 1)]


def _config(**kw):  # -> transformers.BertConfig
    return transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model_dir = root / "tiny-bert"
    model_dir.mkdir()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_config()).save_pretrained(model_dir)
    (root / "config-only.json").write_text(json.dumps(_config().to_dict()))
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for split, rows in (("train", SENTENCES), ("dev", SENTENCES[:4])):
        body = "".join(f"{s}\t{y}\n" for s, y in rows)
        (sst / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    return root, model_dir


def test_sst2_is_tokenised_with_the_folder_tokenizer(files) -> None:
    root, model_dir = files
    data = load_sst2(root / "glue", model_dir, max_length=8)
    assert data.x_train.shape == (8, 2, 8) and data.x_test.shape == (4, 2, 8)
    assert data.y_train.tolist() == [y for _, y in SENTENCES]
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert data.x_train[0, 0].long().tolist() == tok("a good movie", padding="max_length", max_length=8)["input_ids"]
    assert data.x_train[0, 1].long().tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_bad_tsv_raises_naming_the_line(tmp_path) -> None:
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nbroken\tmaybe\n")
    with pytest.raises(ValueError, match=r"line 3: expected 'sentence<TAB>0\|1', got \['broken', 'maybe'\]"):
        read_sst2_tsv(bad)


def test_model_folder_loads_its_weights_and_uses_its_own_loss(files) -> None:
    root, model_dir = files
    model = build_model("hf", (2, 8), 2, path=str(model_dir))
    assert isinstance(model, HFClassifier)
    ref = transformers.BertForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
    for a, b in zip(model.hf.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    data = load_sst2(root / "glue", model_dir, max_length=8)
    x, y = data.x_train, data.y_train
    torch.testing.assert_close(model.loss(x, y), F.cross_entropy(model(x), y))
    fresh = load_hf_model(root / "config-only.json")  # random initialisation from a config.json
    assert not torch.equal(fresh.hf.classifier.weight, model.hf.classifier.weight)


def test_zo_and_fg_w_train_the_hf_model(files) -> None:
    root, model_dir = files
    data = load_sst2(root / "glue", model_dir, max_length=8)
    x, y = data.x_train, data.y_train
    model = load_hf_model(model_dir).double()
    model.eval()  # no dropout in the tiny config anyway

    def loss_fn(m):
        return m.loss(x, y)

    start = float(loss_fn(model).detach())
    est = fwdgrad.estimator("zo", num_directions=2, seed=0, eps=1e-4)
    for _ in range(8):
        est.sgd_step(model, loss_fn, lr=0.05)
    assert float(loss_fn(model).detach()) < start
    with forward_mode_attention(model, quiet=True):
        fwdgrad.estimator("fg-w", seed=0)(model, loss_fn)
    assert all(p.grad is not None for p in model.parameters())


def test_the_cli_fine_tunes_an_hf_folder_on_sst2(files, tmp_path) -> None:
    from fwdgrad import cli

    root, model_dir = files
    args = ["train", "--dataset", "sst2", "--data-dir", str(root / "glue"), "--model", f"hf:{model_dir}",
            "--method", "zo", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0", "--threads", "1",
            "--quiet", "--no-plots", "--out-dir", str(tmp_path), "--name", "sst"]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "sst" / "results.json").read_text())
    assert results["runs"][0]["status"] == "completed" and results["runs"][0]["steps"] == 2
