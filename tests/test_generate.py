"""fffjax.generate: cached greedy tokens against full forwards (FFF and dense), batching, sampling,
stop tokens, one compilation per bucket, the text API and `fffjax generate`, and a tiny decoder end to
end: train a few steps, save, load, generate, cached == uncached."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _decoder_helpers import check_cached_tokens, make, small
from _text_helpers import synthetic_text
from flax import nnx

from fffjax import cli
from fffjax import generate as gen
from fffjax.data.tokenizer import train_wordpiece
from fffjax.models import CausalLM
from fffjax.train import TrainConfig, Trainer, causal_lm_objective
from fffjax.train.checkpoint import inspect_checkpoint, load_checkpoint, save_checkpoint

PROMPTS = [[5, 17, 3], [9, 2, 44, 31, 8, 60, 12, 7, 21]]


@pytest.fixture(scope="module")
def models():
    return {ffn: make(small(ffn)) for ffn in ("fff", "dense")}


def test_bucket_length_is_a_power_of_two_from_the_minimum():
    assert [gen.bucket_length(n) for n in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        gen.bucket_length(0)


@pytest.mark.parametrize("ffn", ["fff", "dense"])
def test_cached_greedy_tokens_are_the_argmax_of_the_full_forward(models, ffn):
    model = models[ffn]
    generated = gen.generate(model, PROMPTS, max_new_tokens=20)
    assert [len(row) for row in generated] == [20, 20]
    assert len(set(generated[0])) > 3   # not one token repeated: the check below has teeth
    assert check_cached_tokens(model, PROMPTS, generated) >= 30


def test_batched_prompts_of_different_lengths_give_each_prompt_its_own_tokens(models):
    model = models["fff"]
    prompts = PROMPTS + [list(range(1, 21))]   # 20 tokens: the batch gets a 32-slot bucket, each prompt alone 16
    batched = gen.generate(model, prompts, max_new_tokens=8)
    for prompt, row in zip(prompts, batched):
        assert gen.generate(model, [prompt], max_new_tokens=8) == [row]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(models):
    model = models["fff"]
    greedy = gen.generate(model, PROMPTS, max_new_tokens=10)
    sampled = gen.generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    assert gen.generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3) == sampled
    assert gen.generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4) != sampled
    assert sampled != greedy
    assert gen.generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=5) == greedy
    assert gen.generate(model, PROMPTS, max_new_tokens=10, temperature=0.8, top_p=1e-6, seed=6) == greedy


def test_filter_logits_keeps_the_top_k_then_the_top_p_nucleus():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    kept = lambda k, p: np.isfinite(np.asarray(gen.filter_logits(logits, k, p)))
    np.testing.assert_array_equal(kept(2, 1.0), [[0, 1, 1, 0], [1, 1, 1, 1]])   # ties with the 2nd stay
    np.testing.assert_array_equal(kept(0, 0.5)[0], [0, 1, 0, 0])     # 0.5 alone reaches 0.5
    np.testing.assert_array_equal(kept(0, 0.6)[0], [0, 1, 1, 0])     # 0.5 + 0.3 reaches 0.6
    np.testing.assert_array_equal(kept(1, 0.9)[0], [0, 1, 0, 0])
    draws = gen.choose_tokens(jnp.repeat(logits[:1], 4000, 0), jax.random.key(0), 1.0, 0, 0.6, greedy=False)
    frequency = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(frequency, [0, 0.625, 0.375, 0], atol=0.03)   # renormalised over the nucleus


def test_stop_tokens_end_a_row_which_then_emits_pad(models):
    model = models["fff"]
    free = gen.generate(model, PROMPTS, max_new_tokens=12)
    stop = free[0][3]
    at = free[0].index(stop)
    steps = list(gen.generate_stream(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop], pad_id=1))
    row0 = [int(step[0]) for step in steps]
    assert row0[:at + 1] == free[0][:at + 1] and set(row0[at + 1:]) <= {1}
    ended = gen.generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    assert ended[0] == free[0][:at + 1]
    assert ended[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])
    alone = list(gen.generate_stream(model, PROMPTS[:1], max_new_tokens=12, stop_tokens=[stop]))
    assert len(alone) == at + 1   # the stream stops once every row has ended


@pytest.mark.parametrize("tokens_per_call", [4, 5])
def test_several_decode_steps_per_call_give_the_same_stream(models, tokens_per_call):
    model = models["fff"]
    free = gen.generate(model, PROMPTS, max_new_tokens=12)
    settings = [dict(), dict(temperature=0.9, top_k=8, top_p=0.9, seed=2), dict(stop_tokens=[free[0][5]], pad_id=1)]
    for options in settings:
        one = list(gen.generate_stream(model, PROMPTS, max_new_tokens=12, **options))
        several = list(gen.generate_stream(model, PROMPTS, max_new_tokens=12, tokens_per_call=tokens_per_call,
                                           **options))
        assert len(several) == len(one)   # 12 tokens, or fewer once every row has stopped
        np.testing.assert_array_equal(np.stack(several), np.stack(one))
    alone = list(gen.generate_stream(model, PROMPTS[:1], max_new_tokens=12, stop_tokens=[free[0][5]],
                                     tokens_per_call=tokens_per_call))
    assert len(alone) == free[0].index(free[0][5]) + 1   # stops mid-call at the row's stop token
    with pytest.raises(ValueError, match="tokens_per_call must be an int >= 1"):
        gen.generate_stream(model, PROMPTS, max_new_tokens=4, tokens_per_call=0)


def test_prefill_and_decode_step_compile_once_per_bucket(monkeypatch):
    # a shape of its own, so that no other test has compiled its programs
    model = make(small("fff", max_seq_length=40))
    traces = {"prefill": 0, "decode_step": 0}
    for name in traces:
        method = getattr(CausalLM, name)

        def counting(self, *args, _name=name, _method=method):
            traces[_name] += 1
            return _method(self, *args)

        monkeypatch.setattr(CausalLM, name, counting)
    for prompt in ([3, 4], [7, 1, 9, 9, 2, 5, 6], list(range(2, 14))):   # one 16-slot bucket
        assert len(gen.generate(model, [prompt], max_new_tokens=14)[0]) == 14
    assert traces == {"prefill": 1, "decode_step": 1}
    for temperature, top_k, top_p, seed in ((0.7, 0, 1.0, 0), (1.3, 5, 0.9, 1)):
        gen.generate(model, [[3, 4, 5]], max_new_tokens=14, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed)
    assert traces == {"prefill": 2, "decode_step": 2}   # sampling is one more program, whatever its settings


def test_refuses_bad_settings_naming_them(models):
    model = models["dense"]
    cases = [
        (dict(prompts=[]), "prompts must be a non-empty sequence"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty sequence"),
        (dict(prompts=[[1, 64]]), r"prompts\[0\] holds ids outside \[0, vocab_size=64\)"),
        (dict(prompts=[list(range(1, 40))]), r"prompts\[0\] has 39 tokens; with max_new_tokens=10"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be an int >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(stop_tokens=[70]), r"stop_tokens must be token ids in \[0, vocab_size=64\)"),
    ]
    for changes, message in cases:
        arguments = {"prompts": PROMPTS, "max_new_tokens": 10, **changes}
        with pytest.raises(ValueError, match=message):   # on the call, before any token is asked for
            gen.generate_stream(model, arguments.pop("prompts"), **arguments)


def _counting_rows(n: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Rows that count up by one from a random start (modulo the ids 1..vocab-1): learnable in a few steps."""
    starts = np.random.default_rng(seed).integers(1, vocab, size=(n, 1))
    return ((starts + np.arange(length) - 1) % (vocab - 1) + 1).astype(np.int32)


def test_a_tiny_decoder_trains_saves_loads_and_generates_cached_as_uncached(tmp_path):
    config = small("fff", init_std=0.02, max_seq_length=32)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    trainer = Trainer(model, causal_lm_objective, TrainConfig(steps=40, batch_size=16, learning_rate=1e-2))
    rows = _counting_rows(16 * 40, 16, config.vocab_size, seed=0)
    losses = []
    for step in range(40):
        batch = rows[16 * step:16 * (step + 1)]
        losses.append(trainer.step({"input_ids": batch, "attention_mask": np.ones_like(batch)})["loss"])
    assert losses[-1] < 0.5 * losses[0], losses

    trained = trainer.model()
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
    path = save_checkpoint(tmp_path / "decoder", params, config.to_dict())
    loaded = gen.load_causal_lm(path)
    assert loaded.config == config and loaded.embedding.dropout.deterministic
    prompts = [[10, 11, 12], [40, 41, 42, 43, 44, 45]]
    generated = gen.generate(loaded, prompts, max_new_tokens=10)
    assert check_cached_tokens(loaded, prompts, generated) >= 10
    assert generated == gen.generate(trained, prompts, max_new_tokens=10)
    assert generated[0][:3] == [13, 14, 15]   # it learned to count

    assert inspect_checkpoint(path)["kind"] == "causal_lm"
    with pytest.raises(ValueError, match="holds a causal language model, not crammed BERT; load it with"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "corpus.txt").write_text(synthetic_text(200))
    tokenizer = train_wordpiece([root / "corpus.txt"], 120, out=root / "tokenizer" / "tokenizer.json")
    config = dataclasses.replace(small("fff"), vocab_size=tokenizer.vocab_size)
    model = make(config)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    path = save_checkpoint(root / "decoder", params, config.to_dict())
    return model, tokenizer, path, root / "tokenizer" / "tokenizer.json"


def test_text_generation_streams_the_pieces_of_the_generated_text(text_model):
    model, tokenizer, _, _ = text_model
    prompt = "the whale swam under"
    ids = gen.prompt_ids(tokenizer, prompt)
    assert ids[0] == tokenizer.cls_id and tokenizer.sep_id not in ids
    text = gen.generate_text(model, tokenizer, prompt, max_new_tokens=12)
    assert text.strip() and "".join(gen.stream_text(model, tokenizer, prompt, max_new_tokens=12)) == text
    new = gen.generate(model, [ids], max_new_tokens=12, stop_tokens=[tokenizer.sep_id])[0]
    assert tokenizer.decode(ids + new) == tokenizer.decode(ids) + text
    both = gen.generate_text(model, tokenizer, [prompt, "the crew"], max_new_tokens=12)
    assert both[0] == text and len(both) == 2


def test_generate_command_streams_the_continuation(text_model, capsys):
    model, tokenizer, path, tokenizer_path = text_model
    prompt = "the captain watched"
    status = cli.main(["generate", str(path), prompt, "--max-new-tokens", "9", "--tokenizer", str(tokenizer_path)])
    assert status == 0
    expected = gen.generate_text(model, tokenizer, prompt, max_new_tokens=9)
    assert capsys.readouterr().out == prompt + expected + "\n"
    cli.main(["generate", str(path), prompt, "--max-new-tokens", "9", "--tokenizer", str(tokenizer_path),
              "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "7"])
    sampled = capsys.readouterr().out
    assert sampled == prompt + gen.generate_text(model, tokenizer, prompt, max_new_tokens=9, temperature=0.9,
                                                 top_k=20, top_p=0.95, seed=7) + "\n"
    cli.main(["generate", str(path), prompt, "--max-new-tokens", "9", "--tokenizer", str(tokenizer_path),
              "--tokens-per-call", "4"])
    assert capsys.readouterr().out == prompt + expected + "\n"
    assert cli.main(["generate", str(path), prompt]) == 2  # a user error: one line, no traceback
    assert "fffjax: error:" in capsys.readouterr().err
