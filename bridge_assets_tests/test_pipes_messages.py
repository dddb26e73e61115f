"""The Pipes reader parses a message only once its line is whole, and misses nothing at exit."""

import json
from pathlib import Path

from bridge_assets.defs.pipes_messages import whole_lines


def test_a_message_caught_mid_write_is_read_whole_and_the_last_write_before_exit_is_not_missed(tmp_path: Path):
    path = tmp_path / "messages"
    first, second = json.dumps({"method": "log", "text": "x" * 5000}), json.dumps({"method": "closed"})
    path.write_text(first[:2939])  # where CI's reader caught a materialization message
    writes = iter([first[2939:] + "\n" + second[:5], second[5:] + "\n"])

    def finished() -> bool:
        """Each poll appends the next piece; the process exits right after its last write."""
        piece = next(writes, None)
        if piece is not None:
            with path.open("a") as stream:
                stream.write(piece)
        return piece is None or piece.endswith(second[5:] + "\n")

    with path.open() as stream:
        lines = list(whole_lines(stream, finished))

    assert [json.loads(line) for line in lines] == [json.loads(first), json.loads(second)]


def test_a_line_the_process_never_ended_is_handed_on_to_fail_loudly(tmp_path: Path):
    path = tmp_path / "messages"
    path.write_text('{"method": "report_asset_mat')
    with path.open() as stream:
        assert list(whole_lines(stream, lambda: True)) == ['{"method": "report_asset_mat']
