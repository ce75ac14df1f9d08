"""A streamed answer reads each image through a handle opened before its headers go out."""

from __future__ import annotations

import base64

from server.openai_api.b64body import Source


def test_a_file_deleted_after_the_answer_was_planned_is_still_sent_in_full(tmp_path):
    data = bytes(range(256)) * 3000  # more than one block
    path = tmp_path / "image.png"
    path.write_bytes(data)
    source = Source.of_file(path)
    path.unlink()  # retention removes it between the 200 and the body
    assert b"".join(source.blocks()) == base64.b64encode(data)
    assert source.b64_len == len(base64.b64encode(data))
