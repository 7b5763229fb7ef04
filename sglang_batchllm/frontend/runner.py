"""`run_batch(program, batch_kwargs, ...)`: SGLang's `SglFunction.run_batch`, with each step of
all programs sent to the server as one batch request (see docs/frontend.md).

The programs run as in SGLang (a thread pool; each program's expressions run on the interpreter's
per-program worker thread), against a `CoalescingRuntimeEndpoint` made for this call. The
interpreter's `StreamExecutor` is subclassed only to tell the coalescer which threads belong to
the batch and when they wait on each other, so it knows when every program is waiting (lock step).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import List, Optional, Union

import tqdm
from sglang.global_config import global_config
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import ProgramState, StreamExecutor, cache_program, run_internal
from sglang.lang.ir import SglCommitLazy, SglSamplingParams

from sglang_batchllm.frontend.coalescing import BatchCancelled, CoalescingRuntimeEndpoint

__all__ = ["BatchCancelled", "run_batch"]


class _TrackedStreamExecutor(StreamExecutor):
    """StreamExecutor that reports its worker thread and its waits to the coalescer."""

    def __init__(self, backend, *args, **kwargs):
        self._ended = False
        co = getattr(backend, "coalescer", None) if isinstance(backend, CoalescingRuntimeEndpoint) else None
        self._co = co
        self._co_rec = co.register_worker(self) if co is not None else None
        try:
            super().__init__(backend, *args, **kwargs)
        except BaseException:
            if self._co_rec is not None:
                co.finish(self._co_rec)
            raise

    def _thread_worker_func(self):
        rec = self._co_rec
        if rec is None:
            return super()._thread_worker_func()
        self._co.bind_worker(rec)
        try:
            return super()._thread_worker_func()
        finally:
            self._co.finish(rec)

    def submit(self, expr):
        if self._co is not None:
            self._co.check_cancelled()
            self._co.progress()
        if self.use_thread and self.is_finished:
            # The worker has left (after an error): SGLang would queue `expr` where nobody takes
            # it, and the program's final sync() would wait forever. Nothing runs it either way.
            self._init_var_event(expr)
            for event in self.variable_event.values():
                event.set()
            return None
        return super().submit(expr)

    def _execute(self, other):
        try:
            return super()._execute(other)
        finally:
            if self._co is not None:
                self._co.progress()

    def _wait(self, over, fn, *args):
        if self._co is None:
            return fn(*args)
        with self._co.blocked(over):
            return fn(*args)

    def _var_ready(self, name):
        event = self.variable_event.get(name)
        return event is None or event.is_set()

    def sync(self):
        q = getattr(self, "queue", None)
        return self._wait(lambda: q is None or q.unfinished_tasks == 0, super().sync)

    def get_var(self, name):
        return self._wait(lambda: self._var_ready(name), super().get_var, name)

    def get_meta_info(self, name, timeout=None):
        return self._wait(lambda: self._var_ready(name), super().get_meta_info, name, timeout)

    def end(self):
        # Idempotent: SGLang calls end() from several places; a second sentinel queued after the
        # worker left would make a later sync() wait forever.
        if getattr(self, "_ended", False):
            return
        self._ended = True
        super().end()

    def fork(self, size: int = 1, position_ids_offset: Optional[List[int]] = None):
        # StreamExecutor.fork, creating tracked executors.
        if size > 1 and str(self.text_):
            self.submit(SglCommitLazy())

        self.sync()
        size = int(size)

        exes = [
            type(self)(self.backend, self.arguments, self.default_sampling_para, self.chat_template, self.stream)
            for _ in range(size)
        ]
        for i in range(size):
            exes[i].variables = dict(self.variables)
            exes[i].text_ = str(self.text_)
            exes[i].messages_ = list(self.messages_)
            exes[i].cur_role = self.cur_role
            exes[i].cur_role_begin_pos = self.cur_role_begin_pos
            exes[i].fork_start_text_pos = len(self.text_)
            exes[i].images_ = list(self.images_)
        return exes


def _run_program(program, backend, func_kwargs, default_sampling_para):
    # sglang.lang.interpreter.run_program(program, backend, (), func_kwargs, default_sampling_para,
    # stream=False, sync=True, use_thread=True) as run_program_batch calls it, with a tracked
    # executor.
    func_kwargs.update(program.bind_arguments)
    stream_executor = _TrackedStreamExecutor(
        backend,
        func_kwargs,
        default_sampling_para,
        chat_template=None,
        stream=False,
        num_api_spec_tokens=program.num_api_spec_tokens,
        use_thread=True,
    )
    state = ProgramState(stream_executor)
    run_internal(state, program, (), func_kwargs, True)
    return state


def _run_tracked(co, program, backend, arguments, default_sampling_para):
    rec = co.program_started()
    try:
        return _run_program(program, backend, arguments, default_sampling_para)
    finally:
        co.program_finished(rec)


def run_batch(
    program,
    batch_kwargs,
    *,
    max_new_tokens: int = 128,
    n: int = 1,
    stop: Optional[Union[str, List[str]]] = None,
    stop_token_ids: Optional[List[int]] = None,
    stop_regex: Optional[Union[str, List[str]]] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    ignore_eos: bool = False,
    return_logprob: Optional[bool] = None,
    logprob_start_len: Optional[int] = None,
    top_logprobs_num: Optional[int] = None,
    return_text_in_logprobs: Optional[bool] = None,
    backend=None,
    num_threads: Union[str, int] = "auto",
    progress_bar: bool = False,
    generator_style: bool = False,
):
    """`program.run_batch(batch_kwargs, ...)` (same options, results, order, progress bar and
    errors), with the concurrent `gen` / `select` / `fork` requests of all programs coalesced into
    batch `/generate` requests.

    `backend` (or SGLang's default backend) must be a `RuntimeEndpoint` (or a `Runtime`); its
    coalescing settings are taken from it when it is a `CoalescingRuntimeEndpoint`. Any other
    backend runs plain `program.run_batch`. `num_threads="auto"` starts every program at once, up
    to the endpoint's `max_batch_size`, so that the server sees each step of all of them."""
    options = dict(
        max_new_tokens=max_new_tokens,
        n=n,
        stop=stop,
        stop_token_ids=stop_token_ids,
        stop_regex=stop_regex,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )
    backend = backend or global_config.default_backend
    endpoint = backend.endpoint if hasattr(backend, "endpoint") else backend
    if not isinstance(endpoint, RuntimeEndpoint):
        return program.run_batch(
            batch_kwargs,
            **options,
            backend=backend,
            num_threads=num_threads,
            progress_bar=progress_bar,
            generator_style=generator_style,
        )

    # SglFunction.run_batch's argument handling.
    if stop is None:
        options["stop"] = []
    if stop_token_ids is None:
        options["stop_token_ids"] = []
    if stop_regex is None:
        options["stop_regex"] = []

    assert isinstance(batch_kwargs, (list, tuple))
    if len(batch_kwargs) == 0:
        return []
    if not isinstance(batch_kwargs[0], dict):
        num_programs = len(batch_kwargs)
        batch_kwargs = [
            {program.arg_names[i]: v for i, v in enumerate(arg_values)}
            for arg_values in batch_kwargs
            if isinstance(arg_values, (list, tuple))
            and len(program.arg_names) - len(program.arg_defaults) <= len(arg_values) <= len(program.arg_names)
        ]
        if len(batch_kwargs) != num_programs:
            raise Exception("Given arguments mismatch the SGL function signature")

    default_sampling_para = SglSamplingParams(**options)
    coalescing = CoalescingRuntimeEndpoint.from_endpoint(endpoint)

    # sglang.lang.interpreter.run_program_batch
    if global_config.enable_precache_with_tracing and len(batch_kwargs) > 1:
        cache_program(program, coalescing)

    if num_threads == "auto":
        num_threads = max(coalescing.max_batch_size, multiprocessing.cpu_count() * 16)
    num_threads = max(1, min(int(num_threads), len(batch_kwargs)))

    if generator_style:
        return _generate(program, coalescing, batch_kwargs, default_sampling_para, num_threads, progress_bar)
    return _run_all(program, coalescing, batch_kwargs, default_sampling_para, num_threads, progress_bar)


class _Pool:
    """The programs of one run_batch on a thread pool (as run_program_batch), cancellable."""

    def __init__(self, co, program, backend, batch_arguments, default_sampling_para, num_threads, pbar):
        self.co = co
        self.pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="batchllm-program")
        co.set_capacity(num_threads)
        self.futures = []
        co.program_submitted(len(batch_arguments))  # all at once: none looks finished before it starts
        try:
            for arguments in batch_arguments:
                f = self.pool.submit(_run_tracked, co, program, backend, arguments, default_sampling_para)
                if pbar is not None:
                    f.add_done_callback(lambda _: pbar.update())
                self.futures.append(f)
        except BaseException:
            co.program_unsubmitted(len(batch_arguments) - len(self.futures))
            self.cancel()
            raise
        self.pool.shutdown(wait=False)  # queued programs still run; the threads exit after them

    def cancel(self):
        """Stop: programs not started never start; waiting and later backend calls raise
        BatchCancelled in their programs, so every thread ends without waiting for the server."""
        cancelled = sum(1 for f in self.futures if f.cancel())
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.co.program_unsubmitted(cancelled)
        self.co.cancel()

    def wait_all(self):
        """All results in input order once every program is done, or the first program error in
        input order (SGLang: `[f.result() for f in futures]` inside the pool's `with`)."""
        try:
            pending = set(self.futures)
            while pending:  # short waits: the main thread stays responsive to KeyboardInterrupt
                _, pending = concurrent.futures.wait(pending, timeout=0.5)
        except BaseException:
            self.cancel()
            raise
        return [f.result() for f in self.futures]

    def iter_results(self):
        try:
            for f in self.futures:
                while True:
                    try:
                        res = f.result(timeout=0.5)
                        break
                    except concurrent.futures.TimeoutError:
                        continue
                yield res
        except GeneratorExit:
            self.cancel()
            raise
        except BaseException as e:
            if not isinstance(e, Exception):
                self.cancel()
            raise


def _run_all(program, backend, batch_arguments, default_sampling_para, num_threads, progress_bar):
    co = backend.coalescer
    try:
        if num_threads == 1:
            co.set_capacity(1)
            rets = []
            iterator = tqdm.tqdm(batch_arguments) if progress_bar else batch_arguments
            for arguments in iterator:
                co.program_submitted()
                rets.append(_run_tracked(co, program, backend, arguments, default_sampling_para))
        else:
            pbar = tqdm.tqdm(total=len(batch_arguments)) if progress_bar else None
            pool = _Pool(co, program, backend, batch_arguments, default_sampling_para, num_threads, pbar)
            rets = pool.wait_all()
            rets[-1].sync()
            if pbar is not None:
                pbar.close()
        return rets
    except BaseException as e:
        if not isinstance(e, Exception):
            co.cancel()
        raise
    finally:
        co.close()


def _generate(program, backend, batch_arguments, default_sampling_para, num_threads, progress_bar):
    # sglang.lang.interpreter._run_program_batch_generator: yields the states in input order.
    co = backend.coalescer
    try:
        if num_threads == 1:
            co.set_capacity(1)
            iterator = tqdm.tqdm(batch_arguments) if progress_bar else batch_arguments
            for arguments in iterator:
                co.program_submitted()
                yield _run_tracked(co, program, backend, arguments, default_sampling_para)
            return
        pbar = tqdm.tqdm(total=len(batch_arguments)) if progress_bar else None
        pool = _Pool(co, program, backend, batch_arguments, default_sampling_para, num_threads, pbar)
        yield from pool.iter_results()
        if pbar is not None:
            pbar.close()
    except BaseException as e:
        if not isinstance(e, Exception):
            co.cancel()
        raise
    finally:
        co.close()
