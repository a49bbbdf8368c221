"""gcp-storage-emulator with a byte-exact reader of multipart uploads; run as the emulator itself
(`python gcs_emulator.py start --port N ...`).

gcsfs uploads a small object as one multipart/related request whose parts end in "\\n--<boundary>". The
emulator (2026.7.19) parses that body with the `email` package, which takes a "\\r" before that "\\n" as part
of the line break, so an object whose last byte is "\\r" is stored one byte short: 1 file in 256 for binary
data such as TensorBoard event files (their last bytes are a CRC). Here a multipart/related body is split
at its boundary lines exactly, with the line break the body itself uses after its first boundary.
"""

import email.message
import email.parser
import json

from gcp_storage_emulator import __main__ as emulator
from gcp_storage_emulator import server

_emulator_read_data = server._read_data


def _multipart_parts(body, boundary):
    """[(headers, content)] of a multipart body, each content byte-exact."""
    first = b"--" + boundary
    start = body.index(first) + len(first)
    newline = b"\r\n" if body[start:start + 2] == b"\r\n" else b"\n"
    parts = []
    for chunk in body[start:].split(newline + first)[:-1]:  # the last piece is "--" and the epilogue
        head, _, content = chunk[len(newline):].partition(newline * 2)
        parts.append((email.parser.BytesHeaderParser().parsebytes(head + newline * 2), content))
    return parts


def _read_data(handler, query):
    content_type = handler.headers.get("Content-Type") or ""
    if not content_type.startswith("multipart/related"):
        return _emulator_read_data(handler, query)
    message = email.message.Message()
    message["Content-Type"] = content_type
    body = server._decode_raw_data(server._read_raw_data(handler), handler)
    (_, meta), (headers, content) = _multipart_parts(body, message.get_param("boundary").encode())
    return {"meta": json.loads(meta), "content": content, "content-type": headers.get_content_type()}


if __name__ == "__main__":
    server._read_data = _read_data
    emulator.main()
