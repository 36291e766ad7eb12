"""MeZO's prompt protocol (fwdgrad.data.prompts, fwdgrad.models.hf_prompt) on generated TSV files and tiny
random language models built here (a causal GPT-2 with a word-level tokenizer, a masked BERT with a
WordPiece one; nothing is downloaded). What is proved: the model's logits are the LM's label-word logits at
the answer position, so the loss is the label-word cross-entropy and the accuracy the argmax over label
words (both computed by hand from unpadded single-prompt passes); the splits have the documented sizes,
are disjoint, and the same seed gives the same split; the task trains from the Trainer and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fwdgrad.data.prompts import (  # noqa: E402
    PROTOCOLS,
    SST2,
    PromptTemplate,
    encode_prompts,
    load_prompt_task,
    parse_prompt_spec,
    read_labelled_tsv,
    sample_splits,
)
from fwdgrad.models.hf_prompt import label_word_ids, load_prompt_lm, load_tokenizer  # noqa: E402

GOOD, BAD = ["good", "fun", "fine", "nice"], ["bad", "dull", "awful", "boring"]
OTHER = ["a", "the", "movie", "film", "very", "plot", "is", "and"]
WORDS = GOOD + BAD + OTHER + ["It", "was", "terrible", "great", "."]
N_TRAIN, N_DEV = 2200, 1100  # enough for k=512 (1024 per class) and MeZO's 1000 / 500 / 1000


def _rows(n: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % 2
        lead = (GOOD if label else BAD)[int(torch.randint(0, 4, (), generator=g))]
        rest = [OTHER[int(j)] for j in torch.randint(0, len(OTHER), (int(torch.randint(1, 6, (), generator=g)),),
                                                     generator=g)]
        rows.append((" ".join([lead, *rest]), label))
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    task = root / "glue" / "SST-2"
    task.mkdir(parents=True)
    for split, n, seed in (("train", N_TRAIN, 0), ("dev", N_DEV, 1)):
        body = "".join(f"{s}\t{y}\n" for s, y in _rows(n, seed))
        (task / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    causal = root / "tiny-gpt2"  # a word-level tokenizer without a mask token: a causal LM
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                         eos_token="<eos>").save_pretrained(causal)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(causal)
    masked = root / "tiny-bert"  # WordPiece with [MASK]: a masked LM
    masked.mkdir()
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w.lower() for w in WORDS]]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(pieces)}).save_pretrained(masked)
    bert = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertForMaskedLM(bert).save_pretrained(masked)
    return root / "glue", causal, masked


def test_split_sizes_and_seeds(files) -> None:
    data, causal, _ = files
    labels = torch.tensor([y for _, y in _rows(N_TRAIN, 0)])
    for spec, sizes in (("k16", (32, 32, N_DEV)), ("k512", (1024, 1024, N_DEV)), ("opt", (1000, 500, 1000)),
                        ("k=3", (6, 6, N_DEV))):
        protocol, seed, _ = parse_prompt_spec(spec)
        train, dev, test = sample_splits(labels, N_DEV, protocol, seed)
        assert (len(train), len(dev), len(test)) == sizes, spec
        assert not set(train.tolist()) & set(dev.tolist())
        if protocol.per_class is not None:
            assert labels[train].bincount().tolist() == [protocol.per_class] * 2
            assert labels[dev].bincount().tolist() == [protocol.per_class] * 2
        again = sample_splits(labels, N_DEV, protocol, seed)
        assert all(torch.equal(a, b) for a, b in zip((train, dev, test), again))
        other = sample_splits(labels, N_DEV, protocol, seed + 1)
        assert not torch.equal(train, other[0])
    # MeZO's 1000 eval examples, or all of them when the file has fewer (SST-2's dev.tsv has 872)
    assert len(sample_splits(labels, 872, PROTOCOLS["opt"], 0)[2]) == 872
    task = load_prompt_task(data, causal, "opt", seed=5, max_length=16)
    assert [t[1].numel() for t in (task.train, task.dev, task.eval)] == [1000, 500, 1000]
    assert task.train[0].shape == (1000, 2, 16)
    again = load_prompt_task(data, causal, "opt", seed=5, max_length=16)
    assert torch.equal(task.train[0], again.train[0]) and torch.equal(task.eval[1], again.eval[1])


def _by_hand(model, tok, sentences, labels, kind) -> tuple[torch.Tensor, float]:
    """The label-word CE and accuracy from one unpadded pass per prompt."""
    ids = label_word_ids(tok, SST2.label_words)
    rows = []
    for s in sentences:
        text = SST2.text.format(sentence=s) + (f"{tok.mask_token}." if kind == "masked" else "")
        enc = tok(text, return_tensors="pt")
        out = model.lm(**enc).logits[0]  # [T, V]
        where = -1 if kind == "causal" else int((enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0])
        rows.append(out[where, ids])
    logits = torch.stack(rows)
    return F.cross_entropy(logits, labels), float((logits.argmax(-1) == labels).double().mean())


@pytest.mark.parametrize("which", ["causal", "masked"])
def test_loss_is_the_label_word_cross_entropy_and_accuracy_the_argmax(files, which) -> None:
    data, causal, masked = files
    folder = causal if which == "causal" else masked
    task = load_prompt_task(data, folder, "k=4", seed=1, max_length=16)
    assert task.kind == which
    model = load_prompt_lm(folder).eval()
    assert model.kind == which
    tok = load_tokenizer(folder)
    texts, _ = read_labelled_tsv(data / "SST-2" / "train.tsv")
    train_idx = sample_splits(torch.tensor([y for _, y in _rows(N_TRAIN, 0)]), N_DEV, parse_prompt_spec("k=4")[0], 1)[0]
    x, y = task.train
    assert tok.unk_token_id not in x[:, 0].long().unique().tolist()  # every word is in the vocabulary
    with torch.no_grad():
        logits = model(x)
        loss, acc = _by_hand(model, tok, [texts[i] for i in train_idx.tolist()], y, which)
        out = model(x, labels=y)
    assert logits.shape == (8, 2)
    torch.testing.assert_close(F.cross_entropy(logits, y), loss, rtol=1e-5, atol=1e-6)
    assert float((logits.argmax(-1) == y).double().mean()) == acc
    torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise(files, tmp_path) -> None:
    _, causal, masked = files
    with pytest.raises(ValueError, match="appends special tokens"):  # BERT ends with [SEP]: no causal answer
        encode_prompts(load_tokenizer(masked), ["good movie"], SST2, "causal", 8)
    tok = load_tokenizer(causal)
    with pytest.raises(ValueError, match="is 2 tokens"):
        label_word_ids(tok, ["terrible", "very good"])
    with pytest.raises(ValueError, match="protocol must be one of"):
        parse_prompt_spec("k17x")
    with pytest.raises(ValueError, match="unknown option"):
        parse_prompt_spec("k16,sed=3")
    assert parse_prompt_spec("opt,seed=4,words=no|yes")[1:] == (4, ("no", "yes"))
    bad = tmp_path / "train.tsv"
    bad.write_text("text\tlabel\nfine\t1\nbroken\tmaybe\n")
    with pytest.raises(ValueError, match="line 3"):
        read_labelled_tsv(bad)
    labels = torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match="needs 32 training rows of class 0"):
        sample_splits(labels, 4, PROTOCOLS["k16"], 0)
    assert PromptTemplate("{sentence} All in all, it was", ("bad", "good")).prompt(" x ") == "x All in all, it was"


def test_the_trainer_fine_tunes_a_prompt_task(files, tmp_path) -> None:
    from fwdgrad.integrations.transformers import Trainer, label_word_accuracy

    data, causal, _ = files
    task = load_prompt_task(data, causal, "k=8", seed=0, max_length=16)
    model = load_prompt_lm(causal)
    args = transformers.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          per_device_eval_batch_size=64, learning_rate=1e-3, max_grad_norm=0,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=task.examples("train"),
                      eval_dataset=task.examples("eval"), compute_metrics=label_word_accuracy,
                      estimator="zo", fused=True)
    trainer.remove_callback(transformers.PrinterCallback)
    assert trainer.train().global_step == 4
    metrics = trainer.evaluate()
    x, y = task.eval
    with torch.no_grad():
        logits = model.eval()(x)
    assert metrics["eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"]), F.cross_entropy(logits, y), rtol=1e-4, atol=1e-5)


def test_the_cli_trains_a_prompt_task(files, tmp_path, capsys) -> None:
    from fwdgrad import cli

    data, causal, _ = files
    args = ["train", "--dataset", "sst2", "--prompt", "k=4,seed=2", "--data-dir", str(data), "--model", f"hf:{causal}",
            "--method", "zo", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0", "--threads", "1",
            "--eval-batch-size", "512", "--quiet", "--no-plots", "--out-dir", str(tmp_path), "--name", "p"]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    run = results["runs"][0]
    assert run["status"] == "completed" and run["steps"] == 2  # k=4 per class: 8 training prompts
    assert results["config"]["model"] == "hf-prompt" and results["config"]["model_options"]["words"] == "terrible|great"
    capsys.readouterr()
    assert cli.main([*args[:3], "--prompt", "k=4", "--model", "mlp", "--data-dir", str(data), "--quiet"]) == 2
    assert "prompt needs dataset sst2" in capsys.readouterr().err
