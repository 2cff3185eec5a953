#!/usr/bin/env python3
"""A stand-in for kubectl, for tests only: no Kubernetes cluster is
reachable on the machines the tests run on.

It answers the commands Flywheel's Kubernetes Job backend uses (apply -f -,
get job NAME -o json|name, logs job/NAME, delete job NAME) and runs a Job's
first container as a local process: its command and args, with the
environment the manifest gives it and nothing from the caller's environment
but PATH, as a pod would. Job state lives in $KUBECTL_STANDIN_STATE; the
process outlives the kubectl call, as a pod outlives its submitter.
"""
import json
import os
import signal
import subprocess
import sys


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def paths(name):
    base = os.path.join(os.environ["KUBECTL_STANDIN_STATE"], name)
    return {k: f"{base}.{k}" for k in ("json", "log", "rc", "pid")}


def apply():
    manifest = json.load(sys.stdin)
    if manifest.get("apiVersion") != "batch/v1" or manifest.get("kind") != "Job":
        fail("error: the stand-in only runs batch/v1 Jobs")
    name = manifest["metadata"]["name"]
    p = paths(name)
    if os.path.exists(p["json"]):
        fail(f'Error from server (AlreadyExists): jobs.batch "{name}" already exists')
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    argv = container.get("command", []) + container.get("args", [])
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    env["STANDIN_RC"] = p["rc"]
    with open(p["json"], "w") as f:
        json.dump(manifest, f)
    log = open(p["log"], "w")
    child = subprocess.Popen(
        ["sh", "-c", '"$@"; echo $? > "$STANDIN_RC"', "pod"] + argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    with open(p["pid"], "w") as f:
        f.write(str(child.pid))
    print(f"job.batch/{name} created")


def get(name, output):
    p = paths(name)
    if not os.path.exists(p["json"]):
        fail(f'Error from server (NotFound): jobs.batch "{name}" not found')
    if output == "name":
        print(f"job.batch/{name}")
        return
    status = {"active": 1}
    if os.path.exists(p["rc"]):
        rc = open(p["rc"]).read().strip()
        if rc == "0":
            status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            status = {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": f"Job has reached the specified backoff limit (exit {rc})",
                    }
                ],
            }
    manifest = json.load(open(p["json"]))
    print(json.dumps({"metadata": manifest["metadata"], "status": status}))


def logs(target, tail):
    name = target.split("/", 1)[1]
    p = paths(name)
    if not os.path.exists(p["log"]):
        fail(f'Error from server (NotFound): jobs.batch "{name}" not found')
    lines = open(p["log"]).read().splitlines()
    print("\n".join(lines[-tail:]))


def delete(name):
    p = paths(name)
    if not os.path.exists(p["json"]):
        fail(f'Error from server (NotFound): jobs.batch "{name}" not found')
    try:
        os.killpg(int(open(p["pid"]).read()), signal.SIGKILL)
    except (ProcessLookupError, FileNotFoundError, ValueError):
        pass
    for f in p.values():
        if os.path.exists(f):
            os.remove(f)
    print(f'job.batch "{name}" deleted')


def main():
    args = sys.argv[1:]
    flags = {}
    positional = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-f", "-o", "-n", "--namespace"):
            flags[a] = args[i + 1]
            i += 2
        elif a.startswith("--"):
            key, _, value = a.partition("=")
            flags[key] = value
            i += 1
        else:
            positional.append(a)
            i += 1
    with open(os.path.join(os.environ["KUBECTL_STANDIN_STATE"], "calls.log"), "a") as f:
        f.write(" ".join(args) + "\n")
    verb = positional[0] if positional else ""
    if verb == "apply" and flags.get("-f") == "-":
        apply()
    elif verb == "get" and positional[1:2] == ["job"]:
        get(positional[2], flags.get("-o", "json"))
    elif verb == "logs":
        logs(positional[1], int(flags.get("--tail", "20")))
    elif verb == "delete" and positional[1:2] == ["job"]:
        delete(positional[2])
    else:
        fail(f"error: the stand-in does not know `{' '.join(args)}`")


main()
