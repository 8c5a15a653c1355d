"""The bare baseline of the client-overhead case: what storing an image costs at the very least.

Takes the ``b64_json`` of one real gateway response and, N times: strict base64 decode, sha256, write the
bytes to a new file. No HTTP, no JSON, no verification, no metadata.

Spec keys: b64_path, output, n, result_path.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from bench.clients.common import Window, count_files, load_spec, write_result


def main() -> None:
    spec = load_spec()
    b64 = Path(spec["b64_path"]).read_text()
    out = spec["output"]
    os.makedirs(out, exist_ok=True)
    n = spec["n"]
    window = Window()
    digest = ""
    for i in range(n):
        data = base64.b64decode(b64, validate=True)
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(out, f"{i}.png"), "wb") as handle:
            handle.write(data)
    window.stop()
    files, size = count_files(out)
    write_result(spec, window.result(n=n, succeeded=n, failed=0, images_kept=files, bytes_kept=size,
                                     image_bytes=len(data), b64_chars=len(b64), last_sha256=digest))


if __name__ == "__main__":
    main()
