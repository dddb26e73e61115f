"""A Pipes message reader that parses a message only once the whole line has been written.

Dagster 1.13's `PipesFileMessageReader` tails the message file with `readline()` and parses
whatever it returns. When the reader catches the training process mid-write it gets half a
message: the JSON error kills its thread, and every later message (the materialization that
carries the registered model version, the closed message) is lost while the run still succeeds
(seen in CI: "Unterminated string", then "did not receive closed message"). This reader keeps a
partial line until its newline arrives, and drains the file once more after the process ends,
so nothing written before the exit is missed.
"""

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

import dagster as dg
from dagster_pipes import PipesDefaultMessageWriter, PipesParams

POLL_SECONDS = 0.01


def whole_lines(stream: TextIO, finished: Callable[[], bool]) -> Iterator[str]:
    """Yields each newline-terminated line of a growing file; stops once `finished()` holds and
    the file is drained. A last line the writer never ended is yielded as it is, so a process
    that died mid-message shows up as a parse error rather than as silence."""
    partial = ""
    while True:
        done = finished()  # read before draining: writes that precede it are then all seen
        while line := stream.readline():
            partial += line
            if partial.endswith("\n"):
                yield partial
                partial = ""
        if done:
            if partial:
                yield partial
            return
        time.sleep(POLL_SECONDS)


class WholeLineMessageReader(dg.PipesMessageReader):
    """Reads Pipes messages from a temporary file, one complete line at a time."""

    @contextmanager
    def read_messages(self, handler: dg.PipesMessageHandler) -> Iterator[PipesParams]:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "messages")
            open(path, "w", encoding="utf-8").close()
            session_closed = threading.Event()
            reader = threading.Thread(target=self._read, args=(path, handler, session_closed), daemon=True)
            reader.start()
            try:
                yield {PipesDefaultMessageWriter.FILE_PATH_KEY: path}
            finally:
                session_closed.set()
                reader.join()

    @staticmethod
    def _read(path: str, handler: dg.PipesMessageHandler, session_closed: threading.Event) -> None:
        try:
            with open(path, encoding="utf-8") as stream:
                for line in whole_lines(stream, session_closed.is_set):
                    handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception(WholeLineMessageReader.__name__, sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a temporary file."
