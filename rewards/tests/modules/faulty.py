#!/usr/bin/env python3
"""A misbehaving reward module for the fault tests: each sample's completion says what to do.

  HANG        never answer          CRASH       write half a line, then exit 3
  GARBAGE     write a non-JSON line NAN / INF   score NaN / Infinity (json.dumps writes bare tokens)
  MISSING     a result without score or error   STRSCORE   score given as a string
  WRONGCOUNT  one result too few    WRONGID     answer with another request id
  ERROR       report an error for this sample   anything else: score = len(completion)
"""
import json
import sys
import time

for line in sys.stdin:
    req = json.loads(line)
    texts = [s["completion"] for s in req["samples"]]
    joined = " ".join(texts)
    if "HANG" in joined:
        time.sleep(3600)
    if "CRASH" in joined:
        sys.stdout.write('{"id": %d, "res' % req["id"])
        sys.stdout.flush()
        sys.exit(3)
    if "GARBAGE" in joined:
        sys.stdout.write("Traceback (most recent call last): oops\n")
        sys.stdout.flush()
        continue
    results = []
    for t in texts:
        if t == "NAN":
            results.append({"score": float("nan")})
        elif t == "INF":
            results.append({"score": float("inf")})
        elif t == "MISSING":
            results.append({"extracted": "x"})
        elif t == "STRSCORE":
            results.append({"score": "1.0"})
        elif t == "ERROR":
            results.append({"error": "cannot score this one"})
        else:
            results.append({"score": float(len(t))})
    if "WRONGCOUNT" in joined:
        results.pop()
    rid = req["id"] + 1 if "WRONGID" in joined else req["id"]
    sys.stdout.write(json.dumps({"id": rid, "results": results}) + "\n")
    sys.stdout.flush()
