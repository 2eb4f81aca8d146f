"""The vhost-user message path's calls into the C shim, for daemon/ (as
probes.py is host memory's read-only views for tools outside host/): the
peek, the end of a message (its reply kept in the journal, the message
taken off the socket, the reply sent) and the journal's mapping. The
calls themselves are in native.py, the one importer of the shim."""

from .native import MSG_ALL, MSG_CONSUME, MSG_KEEP, MSG_SEND, JournalMap, MessageIo, keep_reply

__all__ = ["MSG_ALL", "MSG_CONSUME", "MSG_KEEP", "MSG_SEND", "JournalMap", "MessageIo", "keep_reply"]
