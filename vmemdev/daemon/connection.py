"""One attached front-end (one QEMU), served from an OS thread of its own.

Why a thread: a guest's config read holds a vCPU until GET_CONFIG is
answered, and each virtio-mem request holds the guest's driver until its
used-ring entry appears. Served from Trio tasks, each wake-up cost several
passes of the scheduler (STATE p50 2.0x and GET_CONFIG 2.7x their floors,
see ARCHITECTURE.md); a blocking ``poll()`` loop costs one system call. So
a connection is served the way libvhost-user serves one: one thread polls
the socket, the rings' kick eventfds and a wakeup eventfd, and handles what
is ready, in order. It never handles a message while a request it took is
unanswered, which is what the engine needs of its caller. The Trio side
starts the thread, asks it to stop, and asks it to send config-change
notifications; both go through the wakeup eventfd.

Bytes and fds come in here; ``vhost.Engine`` decides what they mean and
hands back a reply and effects; this class owns every fd the engine names
(kick, call and err eventfds, the backend channel). A front-end that breaks
the protocol gets a logged error and, where it waits for an answer, a
failure reply; only a stream we can no longer parse closes its connection.

The device lock (``lock``) is shared with the control plane, which runs in
Trio: the thread holds it while it handles a message or a request, and lets
go of it while it waits in ``poll()`` and while a request's host work runs
(``serve_request`` does that), so an operator's command never waits for a
discard.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable

import trio

from ..crashpoints import crash_point, crash_points_armed
from ..errors import PeerError
from ..host import messages
from ..protocol import vhost_user as vu
from ..vhost.engine import BackendChannel, Effect, Engine, RingFd, RingRequest, Serve
from ..vhost.interfaces import Device, GuestMemory
from ..vhost.snapshot import snapshot
from . import inflight
from .keeper import Persistence, SavedAnswer
from .trace import Tracer
from .vhost_wire import (
    ConnectionClosed,
    RefusedMessage,
    close_all,
    consume,
    finish_message,
    head_message,
    message_io,
    peek_message,
    read_message,
)

log = logging.getLogger(__name__)

# Called with the device lock held; may release it while host work runs.
ServeRequest = Callable[[RingRequest], bytes]

READABLE = select.POLLIN
CRASH_POINTS = crash_points_armed()  # a test kills this process at named instants
BROKEN = select.POLLERR | select.POLLHUP | select.POLLNVAL
# Messages that change nothing a successor would need: not saved (GET_CONFIG is hot).
PART_WAIT_MS = 5  # how often a message sent in pieces is looked at again
READ_ONLY = frozenset({vu.Request.GET_FEATURES, vu.Request.GET_PROTOCOL_FEATURES, vu.Request.GET_CONFIG,
                       vu.Request.GET_QUEUE_NUM, vu.Request.GET_MAX_MEM_SLOTS})


class Stopping(Exception):
    """The daemon asked this connection to end."""


def _close(fd: int | None) -> None:
    if fd is not None:
        close_all((fd,))


class RingFds:
    """The daemon's side of one ring: its kick, call and err eventfds."""

    def __init__(self, index: int):
        self.index = index
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None

    def signal_used(self) -> None:
        if self.call_fd is None:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as exc:
            log.error("vring %d: cannot signal the call eventfd: %s", self.index, exc)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            _close(fd)
        self.kick_fd = self.call_fd = self.err_fd = None


class FrontendConnection:
    def __init__(self, sock: socket.socket | trio.socket.SocketType, device: Device, memory: GuestMemory,
                 serve_request: ServeRequest, *, lock: threading.Lock | None = None,
                 tracer: Tracer | None = None, engine: Engine | None = None,
                 persistence: Persistence | None = None):
        if isinstance(sock, trio.socket.SocketType):
            sock = socket.socket(fileno=sock.detach())
        sock.setblocking(False)
        self.sock = sock
        self.engine = engine or Engine(device, memory)  # given: resumed from a saved state
        self.persistence = persistence
        self.resumed = engine is not None
        self.serve_request = serve_request
        self.lock = lock or threading.Lock()
        self.max_request = getattr(device, "max_request", 256)
        self.tracer = tracer
        self.rings = [RingFds(i) for i in range(device.num_queues)]
        self._kicks: dict[int, RingFds] = {}  # kick fd -> its ring
        self._poll = select.poll()
        self._wakeup: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_requested = False
        self._ended = False
        self._park_requested = False  # an upgrade: stop between two items of work, state saved
        self._parked = threading.Event()  # set once parked, or once the thread has ended
        self._unpark = threading.Event()
        # One notification per change; each counter has one writer (Trio, the thread).
        self._notifications_asked = 0
        self._notifications_sent = 0
        self._backend_sock: socket.socket | None = None
        # The journal of the message in flight (inflight.py), with a state file.
        self.inflight = persistence.keeper.inflight if persistence is not None else None
        self._redelivered = False  # the next message is one a dead process was applying
        self._resume_notices_owed = False  # a successor's interrupt and config change, once a ring runs
        self._wire = message_io()  # the peek buffer and the shim's, made once

    @property
    def memory(self) -> GuestMemory:
        return self.engine.memory

    # --- the Trio side ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the front-end leaves or we are cancelled (then the
        request in flight is answered first)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                await trio.to_thread.run_sync(self.serve_forever, abandon_on_cancel=False)
                nursery.cancel_scope.cancel()
        finally:
            if self.persistence is not None:  # it ended for good: nothing to resume
                self.persistence.keeper.forget()
            self.close()

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop_requested = True
        self._unpark.set()
        self._wake()

    def park(self, timeout: float) -> bool:
        """Have the serving thread stop between two messages or requests, with
        its state saved and no notification owed, and stay there until
        ``unpark()`` (or until the process is replaced). True once parked;
        False if the connection ended or the thread is busy for ``timeout``
        (then it is not parked)."""
        self._unpark.clear()
        self._park_requested = True
        self._wake()
        if not self._parked.wait(timeout) or self._stop_requested:
            self._park_requested = False
            self._unpark.set()
            return False
        return not self._ended

    def unpark(self) -> None:
        self._park_requested = False
        self._unpark.set()

    def notify_config_change(self) -> None:
        """Send CONFIG_CHANGE_MSG on the backend channel (from the serving thread)."""
        self._notifications_asked += 1
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            os.eventfd_write(self._wakeup, 1)

    def adopt_fds(self, fds: dict[str, int]) -> None:
        """A successor's: the ring eventfds and backend channel the dead process kept."""
        for ring in self.rings:
            for kind in ("kick", "call", "err"):
                fd = fds.get(f"{kind}{ring.index}")
                if fd is not None:
                    self._set_ring_fd(RingFd(kind, ring.index, fd))
        if "backend" in fds:
            self._set_backend_channel(fds["backend"])

    def fds_by_role(self) -> dict[str, int]:
        """Every fd of the connection, by the name a successor finds it under."""
        fds = {"conn": self.sock.fileno()}
        if self._backend_sock is not None:
            fds["backend"] = self._backend_sock.fileno()
        for ring in self.rings:
            for kind, fd in (("kick", ring.kick_fd), ("call", ring.call_fd), ("err", ring.err_fd)):
                if fd is not None:
                    fds[f"{kind}{ring.index}"] = fd
        for i, fd in enumerate(self.memory.fds()):
            fds[f"mem{i}"] = fd
        return fds

    def persist(self, *, fds: bool = True) -> None:
        """Keep the connection resumable (the device lock is held): its fds in
        the fd store, the negotiated state in the state file, the device in
        its record (``keeper.py``). For messages, the control plane and a park."""
        p = self.persistence
        if p is None:
            return
        try:  # a request never changes the connection's fds: a message may
            p.keeper.save(snapshot(self.engine), p.record(), p.answer, self.fds_by_role() if fds else None)
        except OSError as exc:
            log.error("cannot save the connection state (%s): a restart now would lose it", exc)

    def close(self) -> None:
        """Close every fd this connection holds, its socket included."""
        for ring in self.rings:
            ring.close()
        self._kicks.clear()
        if self._backend_sock is not None:
            self._backend_sock.close()
        self.engine.close()
        self._discard_input()
        self.sock.close()
        _close(self._wakeup)
        self._wakeup = None

    def _discard_input(self, limit: int = 1 << 20) -> None:
        """Read what the front-end sent and we did not take (a message left on
        the socket by a protocol error): closed with unread data, the socket
        would tell the front-end "connection reset" instead of a close."""
        try:
            while limit > 0 and (data := self.sock.recv(min(limit, 65536), socket.MSG_DONTWAIT)):
                limit -= len(data)
        except OSError:
            pass

    # --- the serving thread -----------------------------------------------------------------

    def serve_forever(self) -> None:
        assert self._wakeup is not None
        self._poll.register(self._wakeup, READABLE)
        self._poll.register(self.sock, READABLE)
        if self.persistence is not None and not self.resumed:
            with self.lock:  # kept before its first message: a successor serves the handshake
                self.persist()
        if self.resumed:
            mid_operation = self._settle_message()
            with self.lock:
                self.persist(fds=False)  # this process's own record files, of the same state
                for ring in self.rings:
                    self._drain(ring)
            self._resume_notices_owed = True
            if not mid_operation:  # else after the front-end's next message
                self._send_resume_notices()
        try:
            while True:
                if self._park_requested:  # here, nothing is half done
                    self._park_here()
                for fd, events in self._poll.poll():
                    if fd == self._wakeup:
                        self._woken()
                    elif fd in self._kicks:
                        self._kicked(fd, self._kicks[fd], events)
                    elif fd == self.sock.fileno():
                        self._serve_message()
                        if self._resume_notices_owed:
                            self._send_resume_notices()
                        break  # the message may have replaced the fds polled next: poll again
        except Stopping:
            log.info("front-end connection stopped by the daemon")
        except ConnectionClosed as exc:
            log.info("front-end disconnected: %s", exc)
        finally:
            self._ended = True
            self._parked.set()  # whoever waits for a park hears that there will be none

    def _send_resume_notices(self) -> None:
        """A successor's, once a ring runs: the dead process may have published
        a used element without signalling it (a spurious interrupt only makes
        the driver look at the used ring), or saved a change of requested size
        without the notification going out (a spurious one only makes the
        driver read the config again). Not while no ring runs, and when the
        dead process died inside a message that changes state not before the
        front-end's next message has been handled: QEMU is then resetting,
        starting or remapping the device (QEMU 11.1.3 crashed on a config
        change in the middle of a reset), and a driver that starts reads the
        config anyway."""
        if not any(ring.ready for ring in self.engine.rings):
            return
        self._resume_notices_owed = False
        for ring in self.rings:
            if self.engine.rings[ring.index].ready:
                ring.signal_used()
        self.notify_config_change()

    def _park_here(self) -> None:
        self._woken()  # owed notifications go out first
        with self.lock:
            self.persist()
        log.info("connection parked for a handover")
        self._parked.set()
        self._unpark.wait()
        self._parked.clear()
        log.info("connection unparked: serving again")

    def _woken(self) -> None:
        assert self._wakeup is not None
        try:
            os.eventfd_read(self._wakeup)
        except BlockingIOError:
            pass
        if self._stop_requested:
            raise Stopping
        while self._notifications_sent < self._notifications_asked:
            self._notifications_sent += 1
            self._send_config_change()

    def _wait_readable(self) -> None:
        self._wait(self.sock.fileno(), READABLE)

    def _wait(self, fd: int, events: int) -> None:
        """Block until ``fd`` is ready, still answering the Trio side."""
        assert self._wakeup is not None
        poll = select.poll()
        poll.register(fd, events)
        poll.register(self._wakeup, READABLE)
        while True:
            ready = dict(poll.poll())
            if self._wakeup in ready:
                self._woken()
            if fd in ready:
                return

    # --- messages ----------------------------------------------------------------

    def _serve_message(self) -> None:
        """Handle the next message: peeked, handled, then taken off the socket
        as its reply goes out (``finish_message``). With a state file the
        journal (inflight.py) records each step, so a successor finds the
        message or its reply."""
        try:
            peeked = peek_message(self.sock, self._wait_readable, self._wait_more, self._wire)
        except RefusedMessage as exc:
            self._finish(exc.request, exc.length, self._failure(exc.request, exc.flags, exc))
            return
        if peeked is None:  # fds in a piece shorter than the message: read it as it comes
            log.warning("a message whose fds came apart from it: read without a journal")
            self._serve_unpeeked()
            return
        request, flags, payload, fds, length = peeked
        if self.tracer:
            self.tracer.record(True, request, flags, payload, len(fds))
        redelivered, self._redelivered = self._redelivered, False
        journal = self.inflight
        with self.lock:
            if journal is not None and request not in READ_ONLY:
                journal.applying()
            reply = self._dispatch(request, flags, payload, fds, redelivered)
            if request not in READ_ONLY:
                self.persist()
        if CRASH_POINTS:
            crash_point("message-applied")
        self._finish(request, length, reply)

    def _finish(self, request: int, length: int, reply: bytes | None) -> None:
        """Take the handled message off the socket and send its reply, in one
        call of the shim: with a state file the reply is kept in the journal
        first, so that a successor sends it if this process dies before it
        has (inflight.py)."""
        data = b"" if reply is None else vu.encode_reply(request, reply)
        journal = None if self.inflight is None else self.inflight.shim.pointer
        wait = self._wait_readable
        if CRASH_POINTS and journal is not None:  # the tests' deaths between the steps
            steps = [(messages.MSG_CONSUME | messages.MSG_SEND, "")] if not data else \
                [(messages.MSG_KEEP, "reply-owed"), (messages.MSG_CONSUME, "message-consumed"), (messages.MSG_SEND, "")]
            for step, point in steps:
                sent = finish_message(self.sock, self._wire, journal, request, length, data, wait, step)
                if point:
                    crash_point(point)
        else:
            sent = finish_message(self.sock, self._wire, journal, request, length, data, wait)
        if data:
            if self.tracer:
                self.tracer.record(False, request, int(vu.REPLY_FLAGS), data[vu.HEADER.size:], 0)
            if sent < len(data):  # the socket was full
                self._send_all(data[sent:])

    def _reply(self, request: int, data: bytes) -> None:
        if self.tracer:
            self.tracer.record(False, request, int(vu.REPLY_FLAGS), data[vu.HEADER.size:], 0)
        self._send_all(data)

    def _serve_unpeeked(self) -> None:
        """A message read as it comes (``read_message``): taken off before it
        is handled, so a death here loses it (QEMU never sends one so)."""
        fd = self.sock.fileno()
        try:
            request, flags, payload, fds = read_message(self.sock, lambda: self._wait(fd, READABLE))
            if self.tracer:
                self.tracer.record(True, request, flags, payload, len(fds))
        except RefusedMessage as exc:
            reply = self._failure(exc.request, exc.flags, exc)
            request = exc.request
        else:
            with self.lock:
                reply = self._dispatch(request, flags, payload, fds)
                if request not in READ_ONLY:
                    self.persist()
        if reply is not None:
            self._reply(request, vu.encode_reply(request, reply))

    def _settle_message(self) -> bool:
        """A successor: finish the message the dead process was handling
        (inflight.py has the steps). True if it was one that changes state:
        QEMU is then in the middle of starting, resetting or remapping the
        device."""
        journal = self.inflight
        if journal is None:
            return False
        step, request, length, data = journal.read()
        if step == inflight.APPLYING:
            log.warning("the dead process was applying a message: handling it again")
            self._redelivered = True
        elif step == inflight.OWED:
            if head_message(self.sock) == (request, length):  # the front-end waits: it sent nothing since
                consume(self.sock, length, lambda: self._wait(self.sock.fileno(), READABLE), self._wire.data)
            log.warning("sending the reply to %s the dead process owed", vu.request_name(request))
            journal.sending()
            self._reply(request, data)
        elif step == inflight.SENDING:  # also where a message with a reply ends: nothing to do
            log.debug("the last reply, to %s, was being sent or was sent", vu.request_name(request))
        journal.idle()
        return step == inflight.APPLYING or (step == inflight.OWED and request not in READ_ONLY)

    def _wait_more(self) -> bool:
        """Part of a message has arrived: wait a little for the rest (the socket
        stays readable, so poll cannot say when), still answering the Trio
        side. True once the front-end has closed its end."""
        assert self._wakeup is not None
        poll = select.poll()
        poll.register(self._wakeup, READABLE)
        poll.register(self.sock, select.POLLRDHUP)
        closed = False
        for fd, events in poll.poll(PART_WAIT_MS):
            if fd == self._wakeup:
                self._woken()
            elif events & (select.POLLRDHUP | BROKEN):
                closed = True
        return closed

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self._wait(self.sock.fileno(), select.POLLOUT)
            except OSError as exc:
                raise ConnectionClosed(f"cannot answer the front-end: {exc}") from exc

    def _dispatch(self, request: int, flags: int, payload: bytes,
                  fds: tuple[int, ...], redelivered: bool = False) -> bytes | None:
        try:
            msg = vu.decode(request, flags, payload, fds)
        except PeerError as exc:
            close_all(fds)
            return self._failure(request, flags, exc)
        log.debug("<- %s %s", msg.name, msg.body if request != vu.Request.GET_CONFIG else "")
        kept: frozenset[int] = frozenset()
        try:
            outcome = self.engine.handle(msg, redelivered=redelivered)
            if outcome.effects:
                self._apply(outcome.effects)
            kept = outcome.kept_fds
            return outcome.reply
        except PeerError as exc:
            return self._failure(request, flags, exc)
        finally:
            close_all(fd for fd in fds if fd not in kept)

    def _failure(self, request: int, flags: int, exc: Exception) -> bytes | None:
        """Log a refused message; answer a failure where the front-end waits for one.

        With REPLY_ACK negotiated, NEED_REPLY gets a non-zero status. A request
        that carries its own reply (GET_*), or an unknown one the front-end may
        be waiting on, has no honest failure answer: the connection is closed.
        """
        acked = bool(flags & vu.Flags.NEED_REPLY) and self.engine.reply_ack
        if request in vu.REQUESTS_WITH_REPLY or not (vu.is_known(request) or acked):
            log.error("front-end protocol error: %s; closing the connection", exc)
            raise ConnectionClosed("closed after a protocol error")
        if acked:
            log.error("front-end protocol error: %s; answered failure", exc)
            return vu.encode_u64(1)
        log.error("front-end protocol error: %s; message ignored", exc)
        return None

    # --- effects: the fds the engine handed over ------------------------------------

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        """Take what the engine handed over. Raises PeerError for an unusable fd
        (before keeping it: the caller then closes it)."""
        for effect in effects:
            if isinstance(effect, RingFd) and effect.fd is not None:
                try:  # a peer's fd must never block the daemon (a full pipe posing as an eventfd)
                    os.set_blocking(effect.fd, False)
                except OSError as exc:
                    raise PeerError(f"ring {effect.index}: unusable fd ({exc})") from exc
            elif isinstance(effect, BackendChannel):
                self._set_backend_channel(effect.fd)
        for effect in effects:
            if isinstance(effect, RingFd):
                self._set_ring_fd(effect)
        for effect in effects:
            if isinstance(effect, Serve):
                self._drain(self.rings[effect.index])

    def _set_ring_fd(self, effect: RingFd) -> None:
        ring = self.rings[effect.index]
        if effect.kind == "kick":
            self._unwatch(ring)
            _close(ring.kick_fd)
            ring.kick_fd = effect.fd
            if effect.fd is not None:
                self._kicks[effect.fd] = ring
                self._poll.register(effect.fd, READABLE)
        elif effect.kind == "call":
            _close(ring.call_fd)
            ring.call_fd = effect.fd
        else:
            _close(ring.err_fd)
            ring.err_fd = effect.fd

    def _unwatch(self, ring: RingFds) -> None:
        if ring.kick_fd is not None and self._kicks.pop(ring.kick_fd, None) is not None:
            self._poll.unregister(ring.kick_fd)

    def _set_backend_channel(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # the fd stays the caller's, who closes it
            raise PeerError(f"SET_BACKEND_REQ_FD: not a socket ({exc})") from exc
        sock.setblocking(False)  # a front-end that stops reading must not stall us
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_sock = sock

    # --- ring requests ------------------------------------------------------------------

    def _kicked(self, fd: int, ring: RingFds, events: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            if events & BROKEN:
                self._kick_failed(ring, "hung up")
            return  # else a spurious wake-up
        except OSError as exc:
            self._kick_failed(ring, exc)
            return
        with self.lock:
            self._drain(ring)

    def _kick_failed(self, ring: RingFds, why: object) -> None:
        log.error("vring %d: kick fd failed (%s); waiting for a new one", ring.index, why)
        self._unwatch(ring)

    def _drain(self, ring: RingFds) -> None:
        """Answer every request waiting on ``ring`` (the device lock is held)."""
        engine = self.engine
        while (request := engine.take(ring.index, self.max_request)) is not None:
            response = self._answer(ring.index, request)
            engine.complete(request, response)
            ring.signal_used()

    def _answer(self, index: int, request: RingRequest) -> bytes:
        p = self.persistence
        if p is None:  # the hot path without --state-file: nothing more than before
            return self.serve_request(request) if request.chain is not None else b""
        if p.answer is not None:  # a successor's first request: did the dead process decide it already?
            saved, p.answer = p.answer, None
            queue = self.engine.rings[index].queue
            used_after = None if queue is None else (queue.used_idx + 1) & 0xFFFF
            if (saved.ring, saved.head, saved.request, saved.used_idx) == (index, request.head, request.data,
                                                                          used_after):
                log.info("vring %d: head %d re-delivered after a restart: answered as decided before",
                         index, request.head)
                return saved.response
        if request.chain is None:
            return b""
        response = self.serve_request(request)
        device = p.record()
        record = p.keeper.device_record
        if record is not None and record.changes == device.changes:
            return response  # the device did not change (STATE, a refusal): nothing to save
        queue = self.engine.rings[index].queue
        if queue is not None:
            used_after = (queue.used_idx + 1) & 0xFFFF  # once this answer is published
            # The device changed: saved before the guest can see the answer in the used ring.
            try:
                stored = False if record is None else \
                    record.answer(device, index, request.head, request.data, response, used_after)
                if stored is False:  # nothing saved yet by this process, or more than a slot holds
                    p.keeper.save(snapshot(self.engine), device,
                                  SavedAnswer(index, request.head, request.data, response, used_after))
            except OSError as exc:
                log.error("cannot save the connection state (%s): a restart now would lose it", exc)
            if CRASH_POINTS:
                crash_point("answer-saved")  # decided and saved, not yet in the used ring
        return response

    # --- config-change notifications (backend channel) ---------------------------------

    def _send_config_change(self) -> None:
        if self._backend_sock is None:
            log.warning("no backend channel (SET_BACKEND_REQ_FD): cannot notify the driver")
            return
        message = vu.encode(vu.BackendRequest.CONFIG_CHANGE_MSG)  # never NEED_REPLY
        try:
            self._backend_sock.send(message)
        except OSError as exc:  # BlockingIOError included: QEMU stopped reading it
            log.error("cannot send CONFIG_CHANGE_MSG: %s", exc)
            return
        if self.tracer:
            self.tracer.record(False, vu.BackendRequest.CONFIG_CHANGE_MSG, int(vu.Flags.VERSION),
                               b"", 0, channel="backend")
        log.info("config change notified to the front-end")
