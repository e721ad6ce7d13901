#!/usr/bin/env python3
"""Markdown report of one bench/run session.

    bench/report.py                      # the newest bench/results/raw-*.jsonl
    bench/report.py bench/results/raw-20261121T020000Z.jsonl

Writes bench/results/<YYYY-MM-DD>-<hostname>.md (date of the session, UTC) and a copy in
bench/results/latest.md, and prints the report. Medians are over the successful runs of the
session; ratios are ratios of median wall times (msgs/s ratios: mailintake msgs/s / mbsync msgs/s).
"""
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")
RUNNERS = ["limit", "mbsync", "mailintake-sqlite", "mailintake-postgres"]
LABEL = {"efiling": "e-filing", "helpdesk": "helpdesk"}
FULL_N = {"efiling": 2000, "helpdesk": 10000}
MIB = 1024 * 1024

DESC = {
    "limit": "bench/raw_fetch.py (Python stdlib ssl+socket) over IMAPS: LOGIN, SELECT INBOX, one "
             "`UID FETCH 1:* (BODY.PEEK[])`, literals read in 1 MiB chunks and discarded - no parsing, "
             "no storage, no flag changes: the least work any client can do",
    "mbsync": "isync's mbsync over IMAPS, Sync Pull INBOX into a fresh local Maildir (SyncState inside, "
              "fsync default); stores every message, registers nothing, leaves flags alone",
    "mailintake-sqlite": "`mailintake run --once` over IMAPS with a fresh data dir and SQLite registry: "
                         "fetch, durable raw blob, parse, attachments stored, registered, then \\Seen on the server",
    "mailintake-postgres": "the same with a fresh PostgreSQL database on 127.0.0.1 (the PostgreSQL server's "
                           "CPU and memory are not in the worker's CPU/RSS columns; the notes give the CPU of its "
                           "per-connection backends)",
}


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def newest_raw():
    files = sorted(glob.glob(os.path.join(RESULTS, "raw-*.jsonl")))
    if not files:
        sys.exit(f"no raw-*.jsonl in {RESULTS}; run bench/run first")
    return files[-1]


def load(raw_path):
    runs = []
    with open(raw_path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    runs.append(json.loads(line))
                except ValueError:
                    print(f"warning: {raw_path}:{i} is not JSON (interrupted write?), skipped", file=sys.stderr)
    meta = {}
    meta_path = raw_path[:-len(".jsonl")] + ".meta.json"
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    return runs, meta


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            mem_kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return cpu or platform.processor() or "unknown CPU", os.cpu_count(), mem_kb / MIB, platform.release()


def size(b):
    return f"{b / MIB:.1f} MiB" if b >= MIB else f"{b / 1024:.1f} KiB"


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def stats_of(runs):
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return None
    n = ok[0]["n"]
    wall = med([r["wall_s"] for r in ok])
    cpus = os.cpu_count() or 1
    return {
        "ok": len(ok), "all": len(runs), "wall": wall, "msgs_s": n / wall,
        "mb_s": ok[0]["corpus_bytes"] / 1e6 / wall,
        "rss_mib": max((r.get("maxrss_kb") or 0) for r in runs) / 1024,
        "client_cpu": med([(r.get("user_s") or 0) + (r.get("sys_s") or 0) for r in ok]),
        "server_cpu": med([r.get("server_cpu_s") for r in ok]),
        "db_cpu": med([r.get("db_cpu_s") for r in ok]),
        "other_pct": med([100 * (r.get("other_cpu_s") or 0) / (cpus * r["wall_s"]) for r in ok]),
        "quarantined": max((r.get("quarantined") or 0) for r in ok),
        "attachments": sorted({r["attachments"] for r in ok if r.get("attachments") is not None}),
        "attachments_in_corpus": ok[0].get("attachments_in_corpus"),
    }


def ratio_lines(profile, st):
    """(table rows, machine lines, ratio dict) for one profile."""
    lab = LABEL[profile]
    rows, lines, ratios = [], [], {}
    lim, mb = st.get("limit"), st.get("mbsync")
    for backend in ("sqlite", "postgres"):
        ours = st.get(f"mailintake-{backend}")
        ratios[backend] = {
            "limit": ours["wall"] / lim["wall"] if ours and lim else None,
            "mbsync": ours["wall"] / mb["wall"] if ours and mb else None,
            "mbsync_msgs": ours["msgs_s"] / mb["msgs_s"] if ours and mb else None,
        }
    names = [("limit", "mailintake/limit", "mailintake wall / limit wall"),
             ("mbsync", "mailintake/mbsync", "mailintake wall / mbsync wall"),
             ("mbsync_msgs", "mailintake/mbsync msgs/s", "mailintake msgs/s / mbsync msgs/s")]
    for key, machine_name, human in names:
        rows.append(f"| {human} | {fmt(ratios['sqlite'][key])} | {fmt(ratios['postgres'][key])} |")
        for backend in ("sqlite", "postgres"):
            if ratios[backend][key] is not None:
                lines.append(f"ratio {machine_name} ({backend}, {lab}): {ratios[backend][key]:.2f}")
    return rows, lines, ratios


def per_repetition(profile, runs):
    """Lines of mailintake's wall over the limit's and mbsync's within each repetition (the
    runners of one repetition run minutes apart, the repetitions further apart): how far the
    machine's speed moved during the run. Informational; the targets use the medians."""
    by = {}
    for r in runs:
        if r["profile"] == profile and r.get("ok"):
            by.setdefault(r["rep"], {})[r["runner"]] = r["wall_s"]
    out = []
    for backend in ("sqlite", "postgres"):
        for ref in ("limit", "mbsync"):
            pairs = [(rep, w[f"mailintake-{backend}"] / w[ref]) for rep, w in sorted(by.items())
                     if f"mailintake-{backend}" in w and ref in w]
            if len(pairs) < 2:
                continue
            each = " / ".join(f"{x:.2f}" for _, x in pairs)
            out.append(f"| mailintake-{backend} / {ref} | {each} | {med([x for _, x in pairs]):.2f} |")
    if not out:
        return []
    return ["", f"Within each repetition ({LABEL[profile]}; informational: how far the machine's speed "
                "moved between repetitions; the targets use the medians above):", "",
            "| wall ratio | repetitions in order | median |", "|---|---|---|", *out, ""]


def verdict(cond, ours_failed=False):
    if ours_failed:
        return "FAIL (mailintake had no successful run)"
    return "N/A" if cond is None else ("PASS" if cond else "FAIL")


def targets(ratios, st, failed, meta_stats):
    """PASS/FAIL lines. failed[profile]: runners that ran but never succeeded."""
    out = []

    def bad(profile, backend):
        return f"mailintake-{backend}" in failed.get(profile, set())

    ef, hd = ratios.get("efiling"), ratios.get("helpdesk")
    if ef:
        a, b = ef["sqlite"]["limit"], ef["sqlite"]["mbsync"]
        cond = None if a is None or b is None else (a <= 1.5 and b <= 0.7)
        out.append(f"target 1 (e-filing, sqlite): wall {fmt(a)}x limit (<= 1.50) and {fmt(b)}x mbsync "
                   f"(<= 0.70): {verdict(cond, bad('efiling', 'sqlite'))}")
        a = ef["postgres"]["limit"]
        out.append(f"target 2 (e-filing, postgres): wall {fmt(a)}x limit (<= 1.70): "
                   f"{verdict(None if a is None else a <= 1.7, bad('efiling', 'postgres'))}")
    if hd:
        for backend, note in (("sqlite", ""), ("postgres", ", informational")):
            a, m = hd[backend]["limit"], hd[backend]["mbsync_msgs"]
            if note and a is None and m is None and not bad("helpdesk", backend):
                continue
            out.append(f"target 3 (helpdesk, {backend}{note}): wall {fmt(a)}x limit (<= 2.00): "
                       f"{verdict(None if a is None else a <= 2.0, bad('helpdesk', backend))}")
            out.append(f"target 3 stretch (helpdesk, {backend}{note}): msgs/s {fmt(m)}x mbsync (>= 3.00): "
                       f"{verdict(None if m is None else m >= 3.0, bad('helpdesk', backend))}")
    for profile in ("efiling", "helpdesk"):
        if profile not in st:
            continue
        largest = meta_stats[profile]["largest_message_bytes"] / MIB
        bound = 64 + 3 * largest
        for backend in ("sqlite", "postgres"):
            s = st[profile].get(f"mailintake-{backend}")
            if s is not None:
                out.append(f"target 4 ({LABEL[profile]}, {backend}): peak RSS {s['rss_mib']:.1f} MiB <= 64 + 3 x "
                           f"{largest:.2f} = {bound:.1f} MiB: {verdict(s['rss_mib'] <= bound)}")
            elif bad(profile, backend):
                out.append(f"target 4 ({LABEL[profile]}, {backend}): peak RSS <= {bound:.1f} MiB: "
                           f"{verdict(None, True)}")
    return out


def render(runs, meta, raw_path):
    session = meta.get("session") or (runs[0].get("session") if runs else "unknown")
    date = f"{session[0:4]}-{session[4:6]}-{session[6:8]}" if len(session) >= 8 else "unknown-date"
    cpu, ncpu, mem_gib, kernel = machine()
    dovecot = meta.get("dovecot_version") or sh(["dovecot", "--version"]) or "?"
    commit = meta.get("mailintake_commit") or sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]) or "?"
    hhmm = f"{session[9:11]}:{session[11:13]} UTC" if len(session) >= 13 else ""
    profiles = [p for p in ("efiling", "helpdesk") if any(r["profile"] == p for r in runs)]

    # corpus stats: from the session's meta file, else from the cached corpus
    mstats = {}
    for p in profiles:
        if p in meta.get("profiles", {}):
            mstats[p] = meta["profiles"][p]["stats"]
        else:
            r0 = next(r for r in runs if r["profile"] == p)
            path = f"/tmp/mailintake-bench/corpus/{p}-n{r0['n']}-s{r0.get('seed', 42)}/stats.json"
            if os.path.exists(path):
                with open(path) as f:
                    mstats[p] = json.load(f)
            else:
                mstats[p] = {"n": r0["n"], "total_bytes": r0["corpus_bytes"],
                             "total_bytes_crlf": r0.get("corpus_bytes_crlf", 0),
                             "largest_message_bytes": r0["largest_message_bytes"]}

    o = [f"# mailintake throughput benchmark, {date}", ""]
    o.append(f"**{date} {hhmm}** · machine `{socket.gethostname()}`: {cpu}, {ncpu} vCPUs, {mem_gib:.1f} GiB RAM, "
             f"kernel {kernel} · Dovecot {dovecot} · mailintake `{commit}`"
             + (f" · {meta['mbsync_version']}" if meta.get("mbsync_version") else "")
             + (f" · PostgreSQL {meta['postgres_version']}" if meta.get("postgres_version") else "")
             + f" · {meta.get('reps', '?')} alternating repetitions, seed {meta.get('seed', '?')}"
             + (f" · `BENCH_IMAP_EXTRA`: {meta['imap_extra']}" if meta.get("imap_extra") else "")
             + (f" · profiled under `{' '.join(meta['wrap'])}` (times not comparable)" if meta.get("wrap") else "")
             + f" · mailintake `[registry] commit = \"{meta.get('commit_mode', 'message')}\"`")
    o.append("")
    o.append("Corpus (generated by `bench/gen_corpus.py`, byte-identical for the same N and seed):")
    o.append("")
    for p in profiles:
        s = mstats[p]
        att = s.get("attachments")
        by = s.get("attachments_by_type") or {}
        o.append(f"- **{LABEL[p]}**: {s['n']:,} messages, {s['total_bytes'] / 1e6:,.1f} MB as stored "
                 f"({s['total_bytes']:,} bytes, LF; {s.get('total_bytes_crlf', 0):,} on the wire as CRLF), "
                 f"largest message {size(s['largest_message_bytes'])}"
                 + (f", {att:,} attachments (" + ", ".join(f"{k} {v}" for k, v in by.items() if v) + ")"
                    if att is not None else "")
                 + (f"; kinds {s['kinds']}" if s.get("kinds") else ""))
    small = [p for p in profiles if mstats[p]["n"] < FULL_N[p]]
    if small:
        o.append("")
        o.append("> **Development-size run** (" + ", ".join(f"{LABEL[p]} N={mstats[p]['n']}" for p in small)
                 + f"; full size is e-filing N={FULL_N['efiling']}, helpdesk N={FULL_N['helpdesk']}): "
                 "fixed costs (process start, TLS, login, schema migration) dominate; the targets below "
                 "are evaluated but only meaningful at full size.")
    o.append("")
    o.append("Each run: the mailbox is reset untimed (fresh Maildir of hard links, no Dovecot index, "
             "pre-indexed, page cache warm, N unseen verified), then the runner is timed (wall = monotonic "
             "clock of bench/run around `/usr/bin/time -v`) and verified. Medians over the successful runs. "
             "MB = 10^6 bytes of the corpus as stored; RSS in MiB (GNU time's maximum resident set size, "
             "max over all runs). Client CPU = user+sys of the runner (GNU time); Dovecot CPU = CPU of the "
             "session's imap and imap-login processes; other load = CPU used by unrelated processes on the "
             f"machine during the run, as % of {ncpu} vCPUs. Client and server share the same vCPUs: "
             "absolute times are noise, the ratios within one run are the result.")

    all_st, all_ratios, all_failed, machine_lines = {}, {}, {}, []
    for p in profiles:
        n = mstats[p]["n"]
        o += ["", f"## {LABEL[p]} (N = {n:,})", ""]
        o.append("| runner | ok runs | median wall s | msgs/s | MB/s | peak RSS MB (max over runs) | runs' walls s "
                 "| client CPU s | Dovecot CPU s | other load % | notes |")
        o.append("|---|---|---|---|---|---|---|---|---|---|---|")
        st = {}
        for runner in RUNNERS:
            rs = sorted([r for r in runs if r["profile"] == p and r["runner"] == runner], key=lambda r: r["rep"])
            if not rs:
                continue
            s = stats_of(rs)
            walls = " / ".join(f"{r['wall_s']:.2f}" + ("" if r.get("ok") else " (failed)") for r in rs)
            notes = []
            if runner == "mailintake-postgres":
                notes.append("the PostgreSQL server's CPU and memory are not in this row's CPU/RSS"
                             + (f" (its backends used {fmt(s['db_cpu'], '.2f')} s CPU, median)"
                                if s and s["db_cpu"] is not None else ""))
            if s and s["quarantined"]:
                notes.append(f"{s['quarantined']} quarantined")
            if s and s["attachments"] and s["attachments_in_corpus"] is not None \
                    and s["attachments"] != [s["attachments_in_corpus"]]:
                notes.append(f"attachments registered {'/'.join(map(str, s['attachments']))}, "
                             f"in the corpus {s['attachments_in_corpus']}")
            if s is None:
                all_failed.setdefault(p, set()).add(runner)
                o.append(f"| {runner} | 0/{len(rs)} | FAILED | | | "
                         f"{max((r.get('maxrss_kb') or 0) for r in rs) / 1024:.1f} | {walls} | | | | "
                         f"{'; '.join(notes)} |")
                continue
            st[runner] = s
            o.append(f"| {runner} | {s['ok']}/{s['all']} | **{s['wall']:.2f}** | {s['msgs_s']:,.0f} | "
                     f"{s['mb_s']:,.1f} | {s['rss_mib']:.1f} | {walls} | {fmt(s['client_cpu'], '.2f')} | "
                     f"{fmt(s['server_cpu'], '.2f')} | {fmt(s['other_pct'], '.0f')} | {'; '.join(notes)} |")
        all_st[p] = st
        rows, lines, ratios = ratio_lines(p, st)
        all_ratios[p] = ratios
        machine_lines += lines
        o += ["", f"Ratios ({LABEL[p]}; from the median walls above):", "",
              "| ratio | sqlite | postgres |", "|---|---|---|", *rows, ""]
        if lines:
            o += ["```text", *lines, "```"]
        o += per_repetition(p, runs)

    o += ["", "## Targets", ""]
    tl = targets(all_ratios, all_st, all_failed, mstats)
    o += ["```text", *(tl or ["(no mailintake runs)"]), "```"] if tl else ["(no mailintake runs)"]

    failed = [r for r in runs if not r.get("ok")]
    if failed:
        o += ["", "## Failed runs", ""]
        for r in failed:
            o.append(f"- {LABEL.get(r['profile'], r['profile'])} {r['runner']} rep {r['rep']}: "
                     f"{r.get('error', '?')}" + (f" (logs: `{r['logs']}`)" if r.get("logs") else ""))

    o += ["", "## Runners", ""]
    for runner in RUNNERS:
        if any(r["runner"] == runner for r in runs):
            o.append(f"- `{runner}`: {DESC[runner]}")
    loads = [r["loadavg_before"] for r in runs if r.get("loadavg_before") is not None]
    if loads:
        o += ["", f"1-minute load average before the runs: min {min(loads):.2f}, median {med(loads):.2f}, "
                  f"max {max(loads):.2f}. Raw runs: `bench/results/{os.path.basename(raw_path)}`."]
    return "\n".join(o) + "\n", date


def write_report(raw_path):
    runs, meta = load(raw_path)
    if not runs:
        raise SystemExit(f"{raw_path} holds no runs")
    text, date = render(runs, meta, raw_path)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{date}-{socket.gethostname()}.md")
    with open(path, "w") as f:
        f.write(text)
    shutil.copyfile(path, os.path.join(RESULTS, "latest.md"))
    return text, path


def main():
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    raw = sys.argv[1] if len(sys.argv) == 2 else newest_raw()
    text, path = write_report(raw)
    print(text)
    print(f"(written to {path} and {os.path.join(RESULTS, 'latest.md')})", file=sys.stderr)


if __name__ == "__main__":
    main()
