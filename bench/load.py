#!/usr/bin/env python3
"""Load one registry: a thundering herd of pulls of one big blob, then
concurrent pushes of distinct blobs, with manifest GETs timed throughout.

    load.py BASE_URL WORK_DIR [--pullers 64] [--pushers 16] [--pid PID]

WORK_DIR must hold herd.blob and push-N.blob files (load.sh makes them).
Prints one JSON line with throughputs, manifest latency percentiles, errors
and, given --pid, the process's peak RSS (VmHWM). Stdlib and curl only."""

import argparse
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import threading
import time
import urllib.parse


# The load clients run at a lower priority: in a cluster they are other
# machines, and here they must not starve the registry (or the manifest
# sampler) of the two cores they share.
CLIENT_PRIORITY = ["nice", "-n", "10"]


def request(base, method, path, body=None, headers=None):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict((k.lower(), v) for k, v in response.getheaders()), data


def curl_push(base, repository, path, digest):
    """POST then PUT -T, as clients do for a monolithic upload. Returns
    (ok, bytes)."""
    status, headers, _ = request(base, "POST", f"/v2/{repository}/blobs/uploads/")
    if status != 202:
        return False, 0
    location = headers.get("location", "")
    if not location.startswith("http"):
        location = base + location
    separator = "&" if "?" in location else "?"
    result = subprocess.run(
        CLIENT_PRIORITY + ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-T", path,
         "-H", "Content-Type: application/octet-stream", f"{location}{separator}digest={digest}"],
        capture_output=True, text=True)
    return result.stdout.strip() == "201", os.path.getsize(path)


def push_manifest(base, repository, tag, config, layer_digest, layer_size):
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    status, headers, _ = request(base, "POST", f"/v2/{repository}/blobs/uploads/")
    assert status == 202, f"starting the config upload answered {status}"
    location = urllib.parse.urlsplit(headers.get("location", ""))
    query = (location.query + "&" if location.query else "") + f"digest={config_digest}"
    status, _, _ = request(base, "PUT", f"{location.path}?{query}", body=config,
                           headers={"Content-Type": "application/octet-stream"})
    assert status == 201, f"config push answered {status}"
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    }).encode()
    status, _, _ = request(base, "PUT", f"/v2/{repository}/manifests/{tag}", body=manifest,
                           headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 201, f"manifest push answered {status}"


class ManifestSampler(threading.Thread):
    """GETs a manifest every few milliseconds on a fresh connection (as a
    node's containerd resolving a tag would) and records the latency."""

    def __init__(self, base, path):
        super().__init__(daemon=True)
        self.base, self.path = base, path
        self.latencies, self.errors = [], 0
        self.stopping = threading.Event()

    def run(self):
        headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                status, _, _ = request(self.base, "GET", self.path, headers=headers)
                if status != 200:
                    self.errors += 1
            except OSError:
                self.errors += 1
            self.latencies.append(time.perf_counter() - started)
            self.stopping.wait(0.01)

    def stop(self):
        self.stopping.set()
        self.join()
        ordered = sorted(self.latencies)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")
        return {"samples": len(ordered), "p50_ms": round(pick(0.50), 2), "p99_ms": round(pick(0.99), 2), "errors": self.errors}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("work")
    parser.add_argument("--pullers", type=int, default=64)
    parser.add_argument("--pushers", type=int, default=16)
    parser.add_argument("--pid", type=int)
    parser.add_argument("--repository", default="load/herd")
    arguments = parser.parse_args()
    base, work = arguments.base.rstrip("/"), arguments.work

    herd = os.path.join(work, "herd.blob")
    herd_digest = open(herd + ".digest").read().strip()
    herd_size = os.path.getsize(herd)
    ok, _ = curl_push(base, arguments.repository, herd, herd_digest)
    assert ok, "the herd blob could not be pushed"
    push_manifest(base, arguments.repository, "v1", b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}',
                  herd_digest, herd_size)
    manifest_path = f"/v2/{arguments.repository}/manifests/v1"

    # The herd: every puller GETs the whole blob at once.
    sampler = ManifestSampler(base, manifest_path)
    sampler.start()
    pull_cpu = cpu_seconds(arguments.pid)
    started = time.perf_counter()
    pullers = [subprocess.Popen(CLIENT_PRIORITY + ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                 f"{base}/v2/{arguments.repository}/blobs/{herd_digest}"],
                                stdout=subprocess.PIPE, text=True) for _ in range(arguments.pullers)]
    pull_errors, pulled = 0, 0
    for process in pullers:
        output = process.communicate()[0].split()
        if len(output) != 2 or output[0] != "200" or int(output[1]) != herd_size:
            pull_errors += 1
        else:
            pulled += int(output[1])
    pull_seconds = time.perf_counter() - started
    pull_cpu = cpu_seconds(arguments.pid) - pull_cpu if arguments.pid else None
    pull_latency = sampler.stop()
    pull_peak_rss = peak_rss_mib(arguments.pid, reset=True)

    # Concurrent pushes of distinct blobs.
    sampler = ManifestSampler(base, manifest_path)
    sampler.start()
    blobs = [os.path.join(work, f"push-{index}.blob") for index in range(arguments.pushers)]
    results = [None] * len(blobs)

    def push(index):
        digest = open(blobs[index] + ".digest").read().strip()
        results[index] = curl_push(base, f"load/push{index}", blobs[index], digest)

    push_cpu = cpu_seconds(arguments.pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=push, args=(index,)) for index in range(len(blobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    push_seconds = time.perf_counter() - started
    push_cpu = cpu_seconds(arguments.pid) - push_cpu if arguments.pid else None
    push_latency = sampler.stop()
    push_errors = sum(1 for ok, _ in results if not ok)
    pushed = sum(size for ok, size in results if ok)

    report = {
        "pull": {"clients": arguments.pullers, "blob_mib": herd_size >> 20, "seconds": round(pull_seconds, 2),
                 "aggregate_mb_s": round(pulled / pull_seconds / 1e6), "errors": pull_errors, "manifest_get": pull_latency},
        "push": {"clients": arguments.pushers, "seconds": round(push_seconds, 2),
                 "aggregate_mb_s": round(pushed / push_seconds / 1e6), "errors": push_errors, "manifest_get": push_latency},
    }
    if arguments.pid:
        report["pull"]["peak_rss_mib"] = pull_peak_rss
        report["push"]["peak_rss_mib"] = peak_rss_mib(arguments.pid, reset=False)
        report["peak_rss_mib"] = max(report["pull"]["peak_rss_mib"], report["push"]["peak_rss_mib"])
        for phase, cpu, moved in (("pull", pull_cpu, pulled), ("push", push_cpu, pushed)):
            report[phase]["server_cpu_s"] = round(cpu, 2)
            report[phase]["server_cpu_s_per_gib"] = round(cpu / (moved / 2**30), 3) if moved else None
    print(json.dumps(report))


def cpu_seconds(pid):
    """User and system CPU time the process has used so far, in seconds."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid, reset):
    """The process's peak RSS so far (VmHWM); with reset, the peak starts
    again from the current RSS (clear_refs 5), so each phase has its own."""
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as status:
        peak = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    return peak


if __name__ == "__main__":
    main()
