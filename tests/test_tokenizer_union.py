"""The union tokenizer: base ids and splits kept, donor subwords in the BPE model, specials kept special,
byte-level and metaspace tokenizers, the chat template's thinking switches, unsupported tokenizers refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from zenith_merge.demo import ensure_demo, heldout_text
from zenith_merge.demo.corpora import calibration_text
from zenith_merge.demo.tokenizers import QWEN_CHAT_TEMPLATE, ZEN_CHAT_TEMPLATE
from zenith_merge.vocab.chat_template import union_chat_template
from zenith_merge.vocab.output_files import dumps, union_eos_ids, union_tokenizer_config
from zenith_merge.vocab.tokenizer_json import TokenizerError, TokenizerFiles, TokenizerModel
from zenith_merge.vocab.union import union_tokenizer, union_vocabulary

BASE_TEXT = ["hello there, hello world. the cat sat on the mat.\n"] * 40
DONOR_TEXT = ["hell fire and brimstone; firefly fires.\n", "What is 3 + 4? /think\n"] * 40
DONOR_SPECIALS = ("<|im_start|>", "<|im_end|>")
DONOR_ADDED = ("<think>", "</think>", "/think", "/no_think")


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


def _union(base_dir: Path, donor_dirs: dict[str, Path], protect=(), out: Path | None = None):
    base = TokenizerModel.load(base_dir)
    donors = {k: TokenizerModel.load(d) for k, d in donor_dirs.items()}
    vocab = union_vocabulary(base, donors)
    built = union_tokenizer(base, donors, vocab, list(protect))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(dumps(built.data))
        cfg, _ = union_tokenizer_config(vocab, TokenizerFiles.load(base_dir))
        (out / "tokenizer_config.json").write_text(dumps(cfg))
    return vocab, built, Tokenizer.from_str(json.dumps(built.data))


def test_base_ids_and_splits_are_kept_and_donor_subwords_join_the_bpe_model(pair):
    base_dir, donor_dir = pair
    vocab, built, union = _union(base_dir, {"donor": donor_dir})
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    for text in ("hello there", *BASE_TEXT[:1]):
        assert union.encode(text).ids == base.encode(text).ids  # mergekit's union split "hello" here
    assert union.get_vocab() | base.get_vocab() == union.get_vocab()
    assert all(union.token_to_id(t) == i for t, i in base.get_vocab().items())
    fire = union.encode(" fire", add_special_tokens=False)
    assert len(fire.ids) == 1 and fire.ids[0] >= vocab.base_size  # a donor subword, one BPE token
    added = {a["content"] for a in built.data["added_tokens"]} - {a["content"] for a in
                                                                  json.loads(base.to_str())["added_tokens"]}
    assert added == set(DONOR_SPECIALS + DONOR_ADDED)  # nothing else became an added token
    assert built.merges_added > 0 and built.merges_dropped == []


def test_donor_specials_are_single_tokens_that_decode_round_trip_and_stay_special(pair, tmp_path):
    base_dir, donor_dir = pair
    vocab, _, _ = _union(base_dir, {"donor": donor_dir}, out=tmp_path / "union")
    tok = AutoTokenizer.from_pretrained(tmp_path / "union")
    for t in DONOR_SPECIALS + DONOR_ADDED:
        ids = tok(f"a {t} b", add_special_tokens=False).input_ids
        assert vocab.find(t).id in ids and tok.decode([vocab.find(t).id]) == t
    assert set(DONOR_SPECIALS) <= set(tok.all_special_tokens)
    assert tok.decode(tok("x <|im_start|> y", add_special_tokens=False).input_ids, skip_special_tokens=True) == "x  y"
    assert "/think" not in tok.all_special_tokens  # an ordinary added token in the donor, and so in the union


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


def test_protected_text_keeps_the_base_split_where_a_donor_merge_would_change_it(pair):
    base_dir, donor_dir = pair
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    text = "a firefly sat on the mat"
    _, naive, union = _union(base_dir, {"donor": donor_dir})
    assert union.encode(text).ids != base.encode(text).ids  # the donor joins pieces the base leaves apart
    vocab, guarded, union = _union(base_dir, {"donor": donor_dir}, protect=[text])
    assert union.encode(text).ids == base.encode(text).ids
    assert guarded.merges_dropped and guarded.merges_added + len(guarded.merges_dropped) == naive.merges_added
    assert all(vocab.find(t.text) for t in vocab.appended())  # left-out merges keep their tokens for decoding


@pytest.mark.parametrize("kinds", [("metaspace", "byte_level"), ("byte_level", "metaspace"), ("metaspace", "metaspace")])
def test_byte_level_and_metaspace_tokenizers_unite(kinds, tmp_path):
    size = {"byte_level": 300, "metaspace": 100}
    base_dir = _save(_train(BASE_TEXT, kinds[0], size[kinds[0]]), tmp_path / "base")
    donor_dir = _save(_train(DONOR_TEXT, kinds[1], size[kinds[1]], DONOR_SPECIALS, DONOR_ADDED), tmp_path / "donor")
    vocab, _, union = _union(base_dir, {"donor": donor_dir}, protect=BASE_TEXT[:1])
    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    assert TokenizerModel.load(tmp_path / "base").kind == kinds[0]
    assert union.encode(BASE_TEXT[0]).ids == base.encode(BASE_TEXT[0]).ids
    for text in (DONOR_TEXT[0], "hello brimstone fire"):
        assert union.decode(union.encode(text).ids) == base.decode(base.encode(text).ids)
    # the donor's words, spelt the base's way, are BPE tokens of the union that its text encodes to
    words = [t for t in vocab.appended() if not t.added and len(t.surface) >= 4 and t.surface.startswith(b" ")]
    assert words
    assert any(union.encode(t.text, add_special_tokens=False).ids[-1] == t.id for t in words)
    assert vocab.find("<|im_start|>").special and union.encode("<|im_start|>").ids[-1] == vocab.find("<|im_start|>").id


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


# ------------------------------------------------------------------ chat template


CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"}, {"role": "user", "content": "Add 4 and 5."}],
]


@pytest.fixture(scope="module")
def renderer():
    return AutoTokenizer.from_pretrained(ensure_demo("zen-tiny"))


def _render(tok, template: str, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.demo
@pytest.mark.parametrize("gen", [True, False])
def test_union_template_renders_base_chats_as_the_base_does(renderer, gen):
    union = union_chat_template(ZEN_CHAT_TEMPLATE)
    for chat in CHATS:
        assert _render(renderer, union, chat, add_generation_prompt=gen) == \
            _render(renderer, ZEN_CHAT_TEMPLATE, chat, add_generation_prompt=gen)


@pytest.mark.demo
def test_enable_thinking_and_the_soft_switches_decide_the_think_block(renderer):
    union = union_chat_template(ZEN_CHAT_TEMPLATE)
    ask = [{"role": "user", "content": "What is 2 + 3?"}]
    on, off = "<｜Assistant｜><think>\n", "<｜Assistant｜><think>\n\n</think>\n\n"
    assert _render(renderer, union, ask, add_generation_prompt=True, enable_thinking=True).endswith(on)
    assert _render(renderer, union, ask, add_generation_prompt=True, enable_thinking=False).endswith(off)
    no_think = [{"role": "user", "content": "What is 2 + 3? /no_think"}]
    assert _render(renderer, union, no_think, add_generation_prompt=True).endswith(off)
    assert "2 + 3? /no_think" in _render(renderer, union, no_think, add_generation_prompt=True)  # the text stays
    later = [*no_think, {"role": "assistant", "content": "5"}, {"role": "user", "content": "/think and 3 + 4?"}]
    assert _render(renderer, union, later, add_generation_prompt=True).endswith(on)  # the last switch wins
    both = [{"role": "user", "content": "/think no wait /no_think"}]
    assert _render(renderer, union, both, add_generation_prompt=True).endswith(off)
    think = [{"role": "user", "content": "/think 7 * 8?"}]
    assert _render(renderer, union, think, add_generation_prompt=True, enable_thinking=False).endswith(off)


@pytest.mark.demo
def test_a_base_template_that_opens_no_think_block_gets_qwen3s(renderer):
    union = union_chat_template(QWEN_CHAT_TEMPLATE)
    ask = [{"role": "user", "content": "2 + 3?"}]
    assert _render(renderer, union, ask, add_generation_prompt=True, enable_thinking=False) == \
        _render(renderer, QWEN_CHAT_TEMPLATE, ask, add_generation_prompt=True, enable_thinking=False)
    assert _render(renderer, union, ask, add_generation_prompt=True) == \
        _render(renderer, QWEN_CHAT_TEMPLATE, ask, add_generation_prompt=True)
    assert _render(renderer, union, ask, add_generation_prompt=True, enable_thinking=True).endswith(
        "<|im_start|>assistant\n<think>\n")


# ------------------------------------------------------------------ the demo tokenizers


@pytest.fixture(scope="module")
def demo_union():
    zen, qwen = ensure_demo("zen-tiny"), ensure_demo("qwen3-moe-tiny")
    return zen, qwen, _union(zen, {"donor1": qwen}, protect=[calibration_text("code")])


@pytest.mark.demo
def test_held_out_code_tokenizes_to_the_base_tokenizers_ids(demo_union):
    zen, _, (vocab, built, union) = demo_union
    base = Tokenizer.from_file(str(zen / "tokenizer.json"))
    code = heldout_text("code")  # never seen by the protection, which read the calibration split
    assert union.encode(code).ids == base.encode(code).ids
    assert vocab.size > vocab.base_size and len(vocab.appended()) >= 5


@pytest.mark.demo
def test_demo_union_ends_turns_with_both_sources_eos(demo_union):
    zen, qwen, (vocab, _, _) = demo_union
    files = {"base": TokenizerFiles.load(zen), "donor1": TokenizerFiles.load(qwen)}
    models_ = {"base": TokenizerModel.load(zen), "donor1": TokenizerModel.load(qwen)}
    eos = union_eos_ids(vocab, files, models_)
    assert vocab.find("<｜end▁of▁sentence｜>").id == eos[0] and vocab.find("<|im_end|>").id in eos
