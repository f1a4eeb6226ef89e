"""Errors raised by the producer side (sources of samples, sending them)."""

from __future__ import annotations


class ProducerError(Exception):
    """Base class of the producer layer, so a CLI can report any of them in one line."""


class SourceError(ProducerError):
    """A source spec is wrong, or its data cannot be read.

    For a bad row the message is one line naming the file, the line number and
    the problem (``data.csv:12: column 'x': 'abc' is not a number``), so that a
    user can fix the input without a traceback.
    """


class SourceSpecError(SourceError):
    """The source spec itself cannot work (an unknown kind, a CSV source without its label column):
    a usage error, found before anything connects; the CLI exits 2 for it."""

    exit_code = 2


class SourceDataError(SourceError):
    """The source cannot be published as asked, found before anything was produced: a file that
    cannot be opened, a CSV header without a named column, a text column among the features of a CSV
    file (read whole before connecting). A usage error too: the CLI exits 2 for it.

    A bad row met while publishing (stdin, or past the part of a large file checked first) is a plain
    :class:`SourceError`: the records before it were sent, and the run ends with exit 1."""

    exit_code = 2


class SyntheticSpecError(ProducerError, ValueError):
    """A :class:`SyntheticSpec` parameter is out of range.

    Also a ValueError (an invalid argument), and a ProducerError so that a CLI
    reports it in one line like any other producer error.
    """
