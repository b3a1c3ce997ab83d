"""Every collective this process makes, on record: the last N in a ring buffer (which the watchdog
dumps with every verdict, so a missing or mismatched collective is visible), and the time this
rank spent blocked inside them (what is left of a step is the rank's own time: stragglers.py).

``install`` wraps torch.distributed's collective functions once per process, before DeepSpeed's
communication layer starts (it keeps its own references to the all-gather and reduce-scatter it
uses); megalm's own code looks them up at call time. So every collective is seen, and one that
calls another inside it (``all_gather_object`` gathers sizes first) is one entry. Each entry has the op, its process group (by the name the mesh gave it, else
its ranks), the group's own sequence number (the n-th collective on that group: ranks that agree
are at the same number), the bytes this rank put in, the dtype, and its start and duration.

The time blocked is host time: a CPU (gloo) collective returns when its peers have taken part. On
CUDA (NCCL) the call returns at once, so a synchronous collective is bracketed by CUDA events on the
current stream instead, read once the step's work is done (``blocked_s``, after the step's loss was
read back). An asynchronous call (``async_op=True``, ``isend``; ZeRO-3's weight gathers) is recorded but never
counts as blocked time: its wait happens later, on its handle, and counts as the rank's own time.
"""

from __future__ import annotations

import collections
import functools
import inspect
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
       "all_to_all", "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "barrier", "send", "recv",
       "isend", "irecv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "gather_object",
       "all_reduce_coalesced")
POINT_TO_POINT = ("send", "recv", "isend", "irecv", "batch_isend_irecv")  # peers make different ops
# the argument that holds what this rank contributes, where it is not the first
INPUT_ARGUMENT = {"all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "reduce_scatter": "input_list",
                  "reduce_scatter_tensor": "input", "all_to_all": "input_tensor_list", "all_to_all_single": "input"}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


class Entry:
    __slots__ = ("seq", "op", "group", "members", "group_seq", "nbytes", "dtype", "step", "started", "duration_s", "is_async",
                 "_events")

    def what(self) -> str:
        """Which collective: op, group, its number on the group, and what this rank put in."""
        return f"{self.op} on {self.group} #{self.group_seq} ({self.nbytes} B{' ' + self.dtype if self.dtype else ''})"

    def describe(self) -> str:
        """One line: which collective, and how long it took (or for how long it has been waiting)."""
        what = self.what()
        if self.duration_s is None:
            return f"{what}, waiting for {time.time() - self.started:.1f} s"
        return f"{what}, {self.duration_s * 1e3:.2f} ms{' (async)' if self.is_async else ''}"

    def signature(self) -> tuple:
        """What every rank of the group must agree on for this collective to complete."""
        return self.op, self.group, self.group_seq, self.nbytes, self.dtype

    def to_dict(self) -> dict:
        return {"seq": self.seq, "op": self.op, "group": self.group, "members": self.members,
                "group_seq": self.group_seq,
                "bytes": self.nbytes, "dtype": self.dtype, "step": self.step, "started": self.started,
                "duration_s": self.duration_s, "async": self.is_async}


class CollectiveRecorder:
    def __init__(self):
        self.entries: collections.deque[Entry] = collections.deque(maxlen=64)
        self.step = 0  # the optimizer step being taken (the trainer sets it)
        self.installed = False
        self._names: dict[int, str] = {}  # id(group) -> its name
        self._members: dict[int, list[int]] = {}  # id(group) -> its global ranks
        self._sequence: collections.Counter[str] = collections.Counter()
        self._count = 0
        self._blocked = 0.0
        self._pending: list[Entry] = []  # CUDA entries whose events are not read yet
        self._inside = threading.local()  # a collective in progress on this thread (nested ones are its own)

    def install(self, keep: int) -> None:
        """Record every collective from now on, keeping the last ``keep``; idempotent."""
        self.entries = collections.deque(self.entries, maxlen=keep)
        if self.installed:
            return
        c10d = dist.distributed_c10d  # some callers (DeepSpeed's coalesced gathers) name the module itself
        for op in OPS:
            if hasattr(dist, op):
                original = getattr(dist, op)
                recorded = self._wrap(op, original)
                setattr(dist, op, recorded)
                if getattr(c10d, op, None) is original:
                    setattr(c10d, op, recorded)
        self.installed = True

    def name_group(self, group: dist.ProcessGroup, name: str) -> None:
        self._names[id(group)] = name

    def _group(self, group) -> tuple[str, list[int]]:
        """A group's name and members."""
        if group is None:
            group = dist.GroupMember.WORLD
        if id(group) not in self._members:
            self._members[id(group)] = dist.get_process_group_ranks(group)
            if group is dist.GroupMember.WORLD:
                self._names[id(group)] = "world"
            self._names.setdefault(id(group), "ranks " + ",".join(map(str, self._members[id(group)])))
        return self._names[id(group)], self._members[id(group)]

    def _wrap(self, op: str, fn):
        parameters = list(inspect.signature(fn).parameters)
        position = {name: i for i, name in enumerate(parameters)}
        contributed = INPUT_ARGUMENT.get(op, parameters[0] if parameters else "")

        def argument(name: str, args: tuple, kwargs: dict) -> Any:
            i = position.get(name, len(args))
            return args[i] if i < len(args) else kwargs.get(name)

        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            if getattr(self._inside, "active", False):
                return fn(*args, **kwargs)
            tensors = _tensors(argument(contributed, args, kwargs))
            is_async = bool(argument("async_op", args, kwargs)) or op in POINT_TO_POINT[2:]
            entry = self._begin(op, *self._group(argument("group", args, kwargs)), tensors, is_async)
            self._inside.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside.active = False
                self._end(entry)

        return recorded

    def _begin(self, op: str, group: str, members: list[int], tensors: list[torch.Tensor], is_async: bool) -> Entry:
        self._count += 1
        self._sequence[group] += 1
        entry = Entry()
        entry.seq, entry.op, entry.group, entry.members, entry.group_seq, entry.step = \
            self._count, op, group, members, self._sequence[group], self.step
        entry.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        entry.dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else ""
        entry.is_async, entry.duration_s, entry._events = is_async, None, None
        if tensors and tensors[0].is_cuda and not is_async:
            entry._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            entry._events[0].record()
        entry.started = time.time()
        self.entries.append(entry)
        return entry

    def _end(self, entry: Entry) -> None:
        entry.duration_s = time.time() - entry.started
        if entry._events is not None:
            entry._events[1].record()
            self._pending.append(entry)
        elif not entry.is_async:
            self._blocked += entry.duration_s

    def blocked_s(self) -> float:
        """Seconds spent blocked in collectives since the last call (on CUDA: call it once the
        device has finished them, e.g. after reading a result back)."""
        for entry in self._pending:
            start, end = entry._events
            end.synchronize()  # (already done when the step's result was read back)
            entry.duration_s = start.elapsed_time(end) / 1e3
            entry._events = None
            self._blocked += entry.duration_s
        self._pending.clear()
        blocked, self._blocked = self._blocked, 0.0
        return blocked

    def last(self) -> Entry | None:
        """The newest collective: on a CPU, the one this process waits in if it is stuck in one; on
        CUDA the host does not wait in it, but a hang is in the newest the device was given."""
        return self.entries[-1] if self.entries else None

    def dump(self) -> list[dict]:
        return [entry.to_dict() for entry in list(self.entries)]


RECORDER = CollectiveRecorder()  # one per process: the functions it wraps are too
