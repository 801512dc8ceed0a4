"""The coordinator's engine in one process: scheduler, sampler, allocator, detokenizer, worker cores."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatloop import ChatLoop, SamplingParams, load_config
from chatloop.engine import BlockAllocator, QueueFullError, SamplerInput, StageReport, sample
from chatloop.engine.detokenizer import Detokenizer
from chatloop.worker_settings import cores_for_worker, stages_at_once, worker_environment


def _all_blocks_free(llm) -> bool:
    stats = llm.stats()
    return stats.kv_blocks_free == stats.kv_blocks_total > 0


def test_generate_stream_and_chat_agree(llm):
    full = llm.generate("The capital of France is", max_new_tokens=12, ignore_eos=True)
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    assert "".join(llm.stream("The capital of France is", max_new_tokens=12, ignore_eos=True)) == full.text
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in answer.text and answer.finish_reason == "stop"  # ended by the chat's end-of-turn token


def test_concurrent_requests_equal_single_ones(llm):
    prompts = [f"Item {i}: " + "word " * (i * 3) for i in range(12)]
    alone = [llm.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
    together: list = [None] * len(prompts)

    def run(i: int) -> None:
        together[i] = llm.generate(prompts[i], max_new_tokens=6, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert _all_blocks_free(llm)


def test_stop_strings_end_the_text_before_them(llm):
    full = llm.generate("The capital of France is", max_new_tokens=12, ignore_eos=True).text
    stop = full.strip().split()[1]  # the second word
    cut = llm.generate("The capital of France is", max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_cancel_frees_blocks_at_once(llm):
    events = llm.stream_events("Once upon a time", max_new_tokens=500, ignore_eos=True)
    next(events)
    assert not _all_blocks_free(llm)
    events.close()
    deadline = time.monotonic() + 5
    while not _all_blocks_free(llm) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _all_blocks_free(llm)


def test_requests_that_cannot_fit_are_refused(llm):
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        llm.generate("hello", max_new_tokens=llm.capacity_tokens)
    with pytest.raises(ValueError, match="context of 8192"):
        llm.generate("hello", max_new_tokens=9000)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([], max_new_tokens=4)


def test_full_queue_refuses(smollm2_split):
    cfg = load_config(["cluster=single", "cluster.num_workers=2", f"model.partitions_dir={smollm2_split}-two",
                       "cache.kv_cache_mb=16", "batching.max_queue_size=1", "batching.max_batch_size=1"])
    with ChatLoop.start(cfg) as small:
        done = threading.Event()
        ids = small.encode("Count to ten:")
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        small.submit(ids, params, lambda e: e.finish_reason and done.set())  # runs
        time.sleep(0.2)
        small.submit(ids, params, lambda e: None)  # waits in the queue
        with pytest.raises(QueueFullError, match="queue is full"):
            small.submit(ids, params, lambda e: None)
        assert done.wait(60)


@pytest.mark.parametrize(
    "bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"repetition_penalty": 0}])
def test_bad_sampling_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.rpc_transports=[tcp]",
         r"cluster.rpc_transports=\['tcp'\]: give one or more of uv, shm, ibv \(tcp is not one\)"),
        ("cluster.rpc_transports=[]", r"cluster.rpc_transports=\[\]: give one or more of uv"),
        ("cluster.rpc_channels=[basic,fast]", r"cluster.rpc_channels=.*\(fast is not one\)"),
    ],
)
def test_bad_rpc_transport_names(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([override])


def test_sampler_is_seeded_per_sequence_and_step():
    logits = torch.randn(3, 50)
    logits[2] = logits[0]
    p = SamplerInput(1.0, 10, 0.9, 1.0, seed=5, step=3)
    q = SamplerInput(1.0, 10, 0.9, 1.0, seed=6, step=3)
    first = sample(logits, [p, q, p])
    assert first[0] == first[2]  # same seed and step: same token, whatever its neighbours
    assert sample(logits[:1], [p]) == first[:1]
    draws = {sample(logits[:1], [SamplerInput(1.0, 0, 1.0, 1.0, seed=s, step=0)])[0] for s in range(40)}
    assert len(draws) > 3  # it does sample


def test_sampler_top_k_top_p_and_penalty():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    for s in range(30):
        assert sample(logits, [SamplerInput(1.0, 2, 1.0, 1.0, seed=s, step=0)])[0] in (0, 1)
        assert sample(logits, [SamplerInput(1.0, 0, 0.5, 1.0, seed=s, step=0)])[0] == 0  # token 0 alone has p > 0.5
    assert sample(logits, [SamplerInput(0.0, 0, 1.0, 1.0, seed=0, step=0)]) == [0]
    penalized = SamplerInput(0.0, 0, 1.0, 2.0, seed=0, step=0, history=(0,))
    assert sample(logits, [penalized]) == [1]  # 5/2 < 4


def test_block_allocator_gives_back_everything():
    allocator = BlockAllocator(num_blocks=4, block_size=16)
    a = allocator.allocate(40)
    assert len(a) == 3 and allocator.allocate(20) is None
    with allocator.reserved(16) as b:
        assert len(b) == 1 and allocator.num_free == 0
    allocator.free(a)
    assert allocator.num_free == 4
    with pytest.raises(MemoryError, match="no room"), allocator.reserved(100):
        pass


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_detokenizer_holds_back_a_possible_stop_string():
    d = Detokenizer(_CharTokenizer(), stop=("END",))
    out = [d.add(ord(c)) for c in "abcEN"]
    assert "".join(t for t, _ in out) == "abc"  # "EN" is held: it could still become "END"
    text, stopped = d.add(ord("D"))
    assert stopped and text == "" and d.text == "abc"
    d = Detokenizer(_CharTokenizer(), stop=("END",))
    assert [d.add(ord(c))[0] for c in "xENy"] == ["", "", "x", "E"]  # the last len(stop) - 1 characters wait
    assert d.flush() == "Ny"


def _stream(detokenizer: Detokenizer, ids: list[int]) -> str:
    return "".join(detokenizer.add(i)[0] for i in ids) + detokenizer.flush()


class _CountingTokenizer:
    """Forwards to a tokenizer and records how many ids each decode was given."""

    def __init__(self, inner) -> None:
        self.inner, self.lengths = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_detokenizer_streams_what_a_whole_decode_gives_and_decodes_only_a_few_ids_per_token(smollm2_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    text = "Grüße aus Köln! 世界 and 🙂🚀, naïve café. " * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = ids[:50] + [tokenizer.eos_token_id] + ids[50:] + list(range(1000, 1300))  # a special token, then odd ids
    counting = _CountingTokenizer(tokenizer)
    assert _stream(Detokenizer(counting), ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and max(counting.lengths) <= 8  # not the whole sequence again at every token


def test_detokenizer_keeps_the_space_a_sentencepiece_decode_strips_at_the_start():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3, "\u2581again": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer.decode([2]) == "world"  # alone, the leading space is gone
    assert _stream(Detokenizer(tokenizer), [1, 2, 3, 4]) == tokenizer.decode([1, 2, 3, 4]) == "Hello world! again"


@pytest.mark.parametrize(
    "index, workers, threads, cores, expected",
    [(1, 4, 2, list(range(8)), [2, 3]), (3, 4, 8, [0, 1], [0, 1]), (2, 4, 1, [0, 1], [0, 1]),
     (0, 1, 8, [0, 1], [0, 1])],
)
def test_worker_cores(index, workers, threads, cores, expected):
    assert cores_for_worker(index, workers, threads, cores) == expected


def _worker(host: str, cores: list[int], threads: int) -> StageReport:
    return StageReport(name="w", index=0, host=host, cores=tuple(cores), threads=threads)


@pytest.mark.parametrize(
    "workers, expected",
    [
        ([_worker("a", [2 * k, 2 * k + 1], 2) for k in range(4)], 4),  # cores of their own: all at once
        ([_worker("a", [0, 1], 2) for _ in range(4)], 1),  # 2 cores shared by 2-thread workers: one at a time
        ([_worker("a", list(range(16)), 8) for _ in range(4)], 2),
        ([_worker("a", [0, 1], 2), _worker("a", [0, 1], 2), _worker("b", [0, 1], 2)], 2),  # hosts add up
        ([_worker("a", [0, 1], 1) for _ in range(4)], 2),
    ],
)
def test_stages_at_once(workers, expected):
    assert stages_at_once(workers) == expected


def test_worker_environment_is_set_before_torch_loads():
    default = load_config([]).worker
    assert worker_environment(default) == {"GOMP_SPINCOUNT": "20000"}
    plain = load_config(["worker.enable_simd=false", "worker.omp_spin_count=null"]).worker
    assert worker_environment(plain) == {"ATEN_CPU_CAPABILITY": "default"}
    with pytest.raises(ValueError, match="worker.omp_spin_count=-1: need >= 0 or null"):
        load_config(["worker.omp_spin_count=-1"])


def test_padded_rows_make_one_int64_tensor_of_any_sequence_type():
    from chatloop.models.batch import padded

    out = padded([(5, 6, 7), [8], range(2)])
    assert out.dtype == torch.long and out.tolist() == [[5, 6, 7], [8, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize(
    "poison",
    [
        SamplerInput(1e-45, 0, 1.0, 1.0, seed=1, step=0),  # below GREEDY_BELOW: the most likely token
        SamplerInput(1.0, 0, 1e-300, 1.0, seed=1, step=0),  # top-p keeps at least the most likely token
        SamplerInput(1e-45, 0, 1e-300, 0.01, seed=1, step=0, history=(3, 4)),
        SamplerInput(2.0, 1, 1e-300, 10.0, seed=1, step=0, history=(3,)),
        SamplerInput(2e-5, 0, 1.0, 0.01, seed=1, step=0, history=tuple(range(50))),  # 1/T and the penalty in float64
    ],
)
def test_every_accepted_sampling_value_samples_a_token(poison):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 30
    (token,) = sample(logits, [poison])
    assert isinstance(token, int) and 0 <= token < 50
    if poison.temperature < 1e-5 and poison.repetition_penalty == 1.0:
        assert token == int(logits[0].argmax())


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 20)
    logits[1, 4] = float("nan")
    greedy = SamplerInput(0.0, 0, 1.0, 1.0, seed=0, step=0)
    out = sample(logits, [greedy, SamplerInput(0.7, 0, 1.0, 1.0, seed=0, step=0), greedy])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert isinstance(out[1], str) and "logits hold NaN or infinity" in out[1]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_greedy_refuses_a_nan_or_infinite_logit(poison):
    logits = torch.randn(2, 20)
    logits[1, 7] = poison
    greedy = SamplerInput(0.0, 0, 1.0, 1.0, seed=0, step=0)
    out = sample(logits, [greedy, greedy])
    assert out[0] == int(logits[0].argmax())
    assert isinstance(out[1], str) and "logits hold NaN or infinity" in out[1]


def test_greedy_ignores_a_masked_minus_infinity():
    logits = torch.randn(1, 20)
    logits[0, 3] = -float("inf")
    (token,) = sample(logits, [SamplerInput(0.0, 0, 1.0, 1.0, seed=0, step=0)])
    assert token == int(logits[0].argmax()) and token != 3


def test_chunked_prefill_gives_the_same_tokens(llm, smollm2_split):
    prompt = "Once upon a time, in a kingdom by the sea, there lived a princess who " * 3
    whole = llm.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids  # one chunk: 512 by default
    cfg = load_config(["cluster=single", "cluster.num_workers=4", f"model.partitions_dir={smollm2_split}",
                       "cache.kv_cache_mb=32", "batching.prefill_chunk_tokens=7"])
    with ChatLoop.start(cfg) as chunked:
        assert len(chunked.encode(prompt)) > 40  # several chunks of 7
        assert chunked.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids == whole
