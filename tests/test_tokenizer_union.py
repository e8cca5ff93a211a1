"""The union tokenizer on small trained tokenizers: the base's encoder kept (union ids == base ids), donor
subwords in the vocabulary and decoding, donor merges only on request (with protect), specials kept special,
byte-level and metaspace tokenizers, bases whose BPE would reach appended tokens without a merge, unsupported
tokenizers refused, and the demo pair over any seed of the demo's text generators."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zenith_merge.demo import ensure_demo
from zenith_merge.demo.corpus_code import code_sample
from zenith_merge.demo.corpus_maths import maths_sample
from zenith_merge.vocab.output_files import dumps, union_eos_ids, union_tokenizer_config
from zenith_merge.vocab.tokenizer_json import TokenizerError, TokenizerFiles, TokenizerModel
from zenith_merge.vocab.union import union_tokenizer, union_vocabulary

BASE_TEXT = ["hello there, hello world. the cat sat on the mat.\n"] * 40
DONOR_TEXT = ["hell fire and brimstone; firefly fires.\n", "What is 3 + 4? /think\n"] * 40
DONOR_SPECIALS = ("<|im_start|>", "<|im_end|>")
DONOR_ADDED = ("<think>", "</think>", "<tool_call>")


def _train(text: list[str], kind: str, vocab_size: int, specials: tuple[str, ...] = (),
           added: tuple[str, ...] = ()) -> Tokenizer:
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece style: spaces as ▁, bytes as <0xNN> where no character token fits
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", *specials],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(text, trainer)
    if kind == "metaspace":  # byte-fallback tokens, as sentencepiece vocabularies carry them
        vocab = tok.get_vocab()
        tok.add_tokens([])
        data = json.loads(tok.to_str())
        for b in range(256):
            name = f"<0x{b:02X}>"
            if name not in vocab:
                data["model"]["vocab"][name] = len(data["model"]["vocab"])
        tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def _save(tok: Tokenizer, folder: Path, template: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=[t for t in DONOR_SPECIALS if tok.token_to_id(t)])
    if template:
        fast.chat_template = template
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A byte-level base and donor trained on different text; the donor brings chat specials and switches."""
    root = tmp_path_factory.mktemp("tok")
    base = _save(_train(BASE_TEXT, "byte_level", 300), root / "base")
    donor = _save(_train(DONOR_TEXT, "byte_level", 300, DONOR_SPECIALS, DONOR_ADDED), root / "donor")
    return base, donor


def _union(base_dir: Path, donor_dirs: dict[str, Path], protect=(), out: Path | None = None, donor_merges=False):
    base = TokenizerModel.load(base_dir)
    donors = {k: TokenizerModel.load(d) for k, d in donor_dirs.items()}
    vocab = union_vocabulary(base, donors)
    built = union_tokenizer(base, donors, vocab, list(protect), donor_merges=donor_merges)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(dumps(built.data))
        cfg, _ = union_tokenizer_config(vocab, TokenizerFiles.load(base_dir))
        (out / "tokenizer_config.json").write_text(dumps(cfg))
    return vocab, built, Tokenizer.from_str(json.dumps(built.data))


def test_the_union_encodes_as_the_base_and_donor_subwords_join_the_vocabulary_to_decode(pair):
    base_dir, donor_dir = pair
    vocab, built, union = _union(base_dir, {"donor": donor_dir})
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    for text in ("hello there", *BASE_TEXT[:1], *DONOR_TEXT[:2], "a firefly sat on the mat"):
        assert union.encode(text).ids == base.encode(text).ids  # mergekit's union split "hello" here
    assert all(union.token_to_id(t) == i for t, i in base.get_vocab().items())
    assert built.data["model"]["merges"] == json.loads(base.to_str())["model"]["merges"] and built.merges_added == 0
    fire = vocab.find(" fire")
    assert fire is not None and fire.id >= vocab.base_size and not fire.added  # a donor subword, appended
    assert union.decode([fire.id]) == " fire" and union.id_to_token(fire.id) == "Ġfire"
    added = {a["content"] for a in built.data["added_tokens"]} - {a["content"] for a in
                                                                  json.loads(base.to_str())["added_tokens"]}
    assert added == set(DONOR_SPECIALS + DONOR_ADDED)  # nothing else became an added token
    assert [t.spelling for t in vocab.plain_text_added()] == [*DONOR_SPECIALS, *DONOR_ADDED]


def test_donor_merges_are_opt_in_and_protect_keeps_the_text_it_is_given_exact(pair):
    base_dir, donor_dir = pair
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    text = "a firefly sat on the mat"
    vocab, naive, union = _union(base_dir, {"donor": donor_dir}, donor_merges=True)
    assert naive.merges_added > 0 and naive.merges_dropped == []
    fire = union.encode(" fire", add_special_tokens=False)
    assert len(fire.ids) == 1 and fire.ids[0] == vocab.find(" fire").id  # donor merges produce donor subwords
    assert union.encode(text).ids != base.encode(text).ids  # ... and join pieces the base leaves apart
    vocab, guarded, union = _union(base_dir, {"donor": donor_dir}, protect=[text], donor_merges=True)
    assert union.encode(text).ids == base.encode(text).ids
    assert guarded.merges_dropped and guarded.merges_added + len(guarded.merges_dropped) == naive.merges_added
    assert all(vocab.find(t.text) for t in vocab.appended())  # left-out merges keep their tokens for decoding


def test_donor_specials_are_single_tokens_that_decode_round_trip_and_stay_special(pair, tmp_path):
    base_dir, donor_dir = pair
    vocab, _, _ = _union(base_dir, {"donor": donor_dir}, out=tmp_path / "union")
    tok = AutoTokenizer.from_pretrained(tmp_path / "union")
    for t in DONOR_SPECIALS + DONOR_ADDED:
        ids = tok(f"a {t} b", add_special_tokens=False).input_ids
        assert vocab.find(t).id in ids and tok.decode([vocab.find(t).id]) == t
    assert set(DONOR_SPECIALS) <= set(tok.all_special_tokens)
    assert tok.decode(tok("x <|im_start|> y", add_special_tokens=False).input_ids, skip_special_tokens=True) == "x  y"
    assert "<tool_call>" not in tok.all_special_tokens  # an ordinary added token in the donor, and so in the union


def test_every_union_id_decodes(pair, tmp_path):
    base_dir, donor_dir = pair
    vocab, _, _ = _union(base_dir, {"donor": donor_dir}, out=tmp_path / "union")
    tok = AutoTokenizer.from_pretrained(tmp_path / "union")
    assert len(tok) == vocab.size and vocab.padded_size % 64 == 0 and vocab.padded_size >= vocab.size
    for i, t in vocab.tokens.items():
        assert tok.convert_ids_to_tokens(i) is not None
        text = tok.decode([i])
        if t.surface.decode("utf-8", errors="replace") == t.text:
            assert text == t.text, (i, t)


@pytest.mark.parametrize("kinds", [("metaspace", "byte_level"), ("byte_level", "metaspace"), ("metaspace", "metaspace")])
def test_byte_level_and_metaspace_tokenizers_unite(kinds, tmp_path):
    size = {"byte_level": 300, "metaspace": 100}
    base_dir = _save(_train(BASE_TEXT, kinds[0], size[kinds[0]]), tmp_path / "base")
    donor_text = [*DONOR_TEXT, "un café naïve, déjà vu\n"] * 2
    donor_dir = _save(_train(donor_text, kinds[1], size[kinds[1]], DONOR_SPECIALS, DONOR_ADDED), tmp_path / "donor")
    vocab, _, union = _union(base_dir, {"donor": donor_dir})
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    assert TokenizerModel.load(tmp_path / "base").kind == kinds[0]
    # the donor's characters the base lacks ('é', 'ï') would end the base's byte fallback: not appended
    for text in (BASE_TEXT[0], DONOR_TEXT[0], "hello brimstone fire", "firefly: 3 + 4 = 7", "un café naïve"):
        assert union.encode(text).ids == base.encode(text).ids
        assert union.decode(union.encode(text).ids) == base.decode(base.encode(text).ids)
    words = [t for t in vocab.appended() if not t.added and len(t.surface) >= 4]
    assert words and all(union.decode([t.id]).strip() == t.text.strip() for t in words)
    if kinds[0] == "metaspace":
        assert vocab.subwords_left_out.get("donor", 0) > 0
        assert all(len(t.spelling) > 1 for t in vocab.appended() if not t.added)
    assert vocab.find("<|im_start|>").special and union.encode("<|im_start|>").ids[-1] == vocab.find("<|im_start|>").id


def test_a_base_with_ignore_merges_keeps_its_encoding_without_the_donors_subwords(pair, tmp_path):
    base_dir, donor_dir = pair
    data = json.loads((base_dir / "tokenizer.json").read_text())
    data["model"]["ignore_merges"] = True  # Llama 3 style: a pre-token found whole in the vocabulary skips BPE
    (tmp_path / "base").mkdir()
    for f in base_dir.iterdir():
        (tmp_path / "base" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "base" / "tokenizer.json").write_text(json.dumps(data))
    vocab, _, union = _union(tmp_path / "base", {"donor": donor_dir})
    base = Tokenizer.from_file(str(tmp_path / "base" / "tokenizer.json"))
    assert vocab.find(" fire") is None and vocab.subwords_left_out["donor"] > 0
    for text in (" fire", " firefly", *DONOR_TEXT[:2]):
        assert union.encode(text).ids == base.encode(text).ids
    assert vocab.find("<|im_start|>") is not None  # the donor's added tokens still join


def test_unsupported_tokenizers_are_refused_naming_the_file(tmp_path):
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "wp").mkdir()
    wp.save(str(tmp_path / "wp" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"wp/tokenizer.json: tokenizer model type 'WordPiece' is not supported"):
        TokenizerModel.load(tmp_path / "wp")
    plain = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "ws").mkdir()
    plain.save(str(tmp_path / "ws" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"ws/tokenizer.json: a BPE tokenizer without byte-level or metaspace"):
        TokenizerModel.load(tmp_path / "ws")
    with pytest.raises(TokenizerError, match=r"nothing/tokenizer.json: missing"):
        TokenizerModel.load(tmp_path / "nothing")


# ------------------------------------------------------------------ the demo tokenizers


@pytest.fixture(scope="module")
def demo_union():
    zen, qwen = ensure_demo("zen-tiny"), ensure_demo("qwen3-moe-tiny")
    return zen, qwen, _union(zen, {"donor1": qwen}), Tokenizer.from_file(str(zen / "tokenizer.json"))


@pytest.mark.demo
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), style=st.sampled_from(["plain", "r1_chat", "qwen_chat"]))
def test_demo_code_and_maths_from_any_seed_tokenize_to_the_base_tokenizers_ids(demo_union, seed, style):
    _, _, (vocab, _, union), base = demo_union
    r = random.Random(seed)
    code = "".join(code_sample(r) for _ in range(3))
    maths = "".join(maths_sample(r, style) for _ in range(3))
    for text in (code, maths):
        if not any(t.text in text for t in vocab.plain_text_added()):  # the one documented exception
            assert union.encode(text).ids == base.encode(text).ids


@pytest.mark.demo
def test_demo_union_ends_turns_with_both_sources_eos(demo_union):
    zen, qwen, (vocab, _, _), _ = demo_union
    files = {"base": TokenizerFiles.load(zen), "donor1": TokenizerFiles.load(qwen)}
    models_ = {"base": TokenizerModel.load(zen), "donor1": TokenizerModel.load(qwen)}
    eos = union_eos_ids(vocab, files, models_)
    assert vocab.find("<｜end▁of▁sentence｜>").id == eos[0] and vocab.find("<|im_end|>").id in eos
    assert vocab.find("<think>").id < vocab.base_size and vocab.find("/think") is None  # text, as in Qwen3
