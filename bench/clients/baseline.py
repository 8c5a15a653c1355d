"""The bare baseline of the client-overhead case: what storing an image costs at the very least.

Takes the ``b64_json`` of one real gateway response and, N times: strict base64 decode, sha256, write the
bytes to a new file. No HTTP, no JSON, no verification, no metadata.

Spec keys: b64_path, output, n, decoder ("pybase64", the engine's decoder, or "stdlib", what a hand-written
script would use), result_path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

import orjson
import pybase64

from bench.clients.common import Window, count_files, load_spec, write_result


def main() -> None:
    spec = load_spec()
    b64 = Path(spec["b64_path"]).read_text()
    out = spec["output"]
    os.makedirs(out, exist_ok=True)
    n = spec["n"]
    decode = {"pybase64": pybase64.b64decode, "stdlib": base64.b64decode}[spec.get("decoder", "pybase64")]
    window = Window()
    digest = ""
    for i in range(n):
        data = decode(b64, validate=True)
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(out, f"{i}.png"), "wb") as handle:
            handle.write(data)
    window.stop()
    files, size = count_files(out)
    # Outside the window: what parsing the response body costs on its own (orjson, as the engine does). No
    # client that receives the image as JSON can avoid it, so baseline + this is a floor for any of them.
    body = orjson.dumps({"created": 0, "data": [{"b64_json": b64}]})
    rounds = min(n, 200)
    started = time.process_time()
    for _ in range(rounds):
        orjson.loads(body)
    json_parse_ms = (time.process_time() - started) * 1000.0 / rounds
    write_result(spec, window.result(n=n, succeeded=n, failed=0, images_kept=files, bytes_kept=size,
                                     image_bytes=len(data), b64_chars=len(b64), last_sha256=digest,
                                     decoder=spec.get("decoder", "pybase64"),
                                     json_parse_ms_per_image=round(json_parse_ms, 3)))


if __name__ == "__main__":
    main()
