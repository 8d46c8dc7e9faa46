"""The `imagestream` command line. Every option can also be set as an IMAGESTREAM_* variable."""

from __future__ import annotations

import os
import pathlib
import sys

import click

from imagestream import config
from imagestream.errors import ImagestreamError


def _setting(name: str, **kwargs):  # type: ignore[no-untyped-def]
    """A click option backed by config.SETTINGS[name] (same flag, variable and default everywhere)."""
    s = config.SETTINGS[name]

    def apply(value: str | None) -> str:
        if value is not None:
            os.environ[s.env] = str(value)  # so that config.get() and child processes see it too
        return config.get(name)

    return click.option(s.flag, name, envvar=s.env, default=None, show_envvar=True,
                        help=f"{s.help} (default: {s.default or 'see text'})",
                        callback=lambda ctx, param, value: apply(value), expose_value=False, is_eager=True, **kwargs)


def _fail(e: Exception) -> None:
    click.echo(f"imagestream: error: {e}", err=True)
    sys.exit(1)


def _ask(make_client, call):  # type: ignore[no-untyped-def]
    """One call on a gRPC client made (in the event loop) by `make_client`, closed afterwards; an error is
    one line and exit status 1."""
    import asyncio

    async def run():  # type: ignore[no-untyped-def]
        client = make_client()
        try:
            return await call(client)
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except ImagestreamError as e:
        _fail(e)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_setting("home")
@_setting("cache_dir")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Container image streaming: mount an image in about a second and fetch only what is read."""
    import atexit

    if ctx.invoked_subcommand not in TRACED:
        return  # the tracing SDK and its exporter take longer to import than a warm `run` takes
    from imagestream import telemetry

    if telemetry.setup_tracing("imagestream"):
        atexit.register(telemetry.shutdown)


# the commands whose own calls are worth a trace (reads are traced by the node's FUSE client)
TRACED = {"push", "images", "rm", "gc", "mirror"}


# -- stack ------------------------------------------------------------------

@main.group()
def stack() -> None:
    """Developer tooling: the local stack (Redis, Cassandra, the tiers on loopback) and test images.

    These commands need the repository's developer tools (devtools/imagestream_dev), which a checkout
    installs and production images leave out."""
    import importlib.util

    if importlib.util.find_spec("imagestream_dev") is None:
        _fail(ImagestreamError("the stack commands need the developer tools (devtools/imagestream_dev): "
                               "run them from a checkout of the repository after scripts/bootstrap"))


@stack.command("up")
def stack_up() -> None:
    """Start what is not running and wait until everything is ready (running it twice is harmless)."""
    from imagestream_dev.stack import local

    click.echo(f"starting the local stack in {config.home()}")
    local.up(click.echo)


@stack.command("down")
def stack_down() -> None:
    """Unmount every image and stop every process of the stack."""
    from imagestream_dev.stack import local

    local.down(click.echo)


@stack.command("status")
def stack_status() -> None:
    """Which processes run and answer their health checks."""
    from imagestream_dev.stack import local

    rows = local.status()
    for r in rows:
        state = "ready" if r["ready"] else ("starting/unhealthy" if r["pid"] else "stopped")
        click.echo(f"{r['name']:12} {state:18} pid {r['pid'] or '-':<8} {r['log']}")
    sys.exit(0 if all(r["ready"] for r in rows) else 3)


# -- images -----------------------------------------------------------------

@main.command()
@click.argument("source", type=click.Path(exists=False))
@click.argument("name")
@_setting("region")
@_setting("chunk_size")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.option("--no-streaming", is_flag=True, help="nodes must pull this image in full before running it")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="the manifest to take from a multi-platform image (default: this node's)")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="registry source: trust this CA (PEM) for its TLS certificate")
@click.option("--plain-http", is_flag=True, help="registry source: speak plain HTTP (a local registry)")
def push(source: str, name: str, quiet: bool, no_streaming: bool, platform: str | None, ca_file: str | None,
         plain_http: bool) -> None:
    """Convert SOURCE and publish it as NAME. SOURCE is an OCI layout dir, an OCI archive, a docker save
    archive, or an image in a registry: HOST[:PORT]/REPOSITORY[:TAG|@DIGEST] (credentials from Docker's
    config.json: $DOCKER_CONFIG/config.json or ~/.docker/config.json)."""
    from imagestream_cli.push import SourceOptions, push as do_push

    try:
        result = do_push(source, name, progress=not quiet, streaming=not no_streaming,
                         options=SourceOptions(platform, ca_file, plain_http))
    except ImagestreamError as e:
        _fail(e)
    click.echo(result.summary())


@main.command()
@_setting("region")
@click.option("--limit", type=int, default=0, help="check only the first N chunks (default: all)")
@click.option("--list", "list_only", is_flag=True, help="only list the chunks quarantined so far")
def scrub(limit: int, list_only: bool) -> None:
    """Check every chunk of the regional store against its digest; corrupt ones are quarantined and healed
    from a good replica where one exists. Exits 1 if a chunk stays corrupt."""
    import asyncio
    import datetime

    from imagestream.digests import Digest
    from imagestream.rpc.client import GrpcRegionalAdmin

    reply = _ask(lambda: GrpcRegionalAdmin(config.get("region")),
                 lambda admin: admin.list_quarantine() if list_only else admin.scrub(limit))
    chunks = reply.chunks if list_only else reply.found
    if not list_only:
        click.echo(f"scrubbed {reply.checked} chunks ({reply.bytes / 1e6:.1f} MB) in {reply.seconds:.1f} s: "
                   f"{reply.corrupt} corrupt, {reply.healed} healed from a good replica, {reply.unhealed} quarantined "
                   f"without a good copy, {reply.unreadable} unreadable")
        if reply.replicas_not_reached:
            click.echo(f"  {reply.replicas_not_reached} chunks have a replica that did not answer (a node down or "
                       "restarting): those copies were not checked; scrub again when every node is up")
    for q in chunks:
        state = "healed" if q.healed else "QUARANTINED (push an image holding it again)"
        found = datetime.datetime.fromtimestamp(q.found_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"  {Digest.from_proto(q.digest)}  {state}  found {found} UTC: {q.reason}")
    if not list_only and (reply.unhealed or reply.unreadable):
        sys.exit(1)


@main.command()
@_setting("region")
@_setting("node_cache_socket")
@click.option("--node", "on_node", is_flag=True,
              help="collect on this node instead: remove every chunk on its disk that no mounted image pins")
@click.option("--dry-run", is_flag=True, help="only count what would be collected")
@click.option("--grace", type=int, default=0, metavar="SECONDS",
              help="keep what a push wrote or found stored this recently (default: the store's IMAGESTREAM_GC_GRACE)")
def gc(on_node: bool, dry_run: bool, grace: int) -> None:
    """Collect garbage in the regional store, mark and sweep: chunks, indexes, profiles and blobs that no
    name, no OCI tag, no mount lease and no push under way (the grace period) references."""
    import asyncio

    from imagestream.rpc.client import GrpcRegionalAdmin, NodeClient

    if grace < 0:
        _fail(click.UsageError("--grace must be >= 0"))

    if on_node:
        r = _ask(lambda: NodeClient("unix:" + config.node_cache_socket()), lambda node: node.collect_garbage(dry_run))
    else:
        r = _ask(lambda: GrpcRegionalAdmin(config.get("region")), lambda admin: admin.collect_garbage(grace, dry_run))
    verb = "would collect" if dry_run else "collected"
    if on_node:
        click.echo(f"node: {verb} {r.chunks_collected} unpinned chunks, {r.bytes_collected / 1e6:.1f} MB reclaimed; "
                   f"{r.chunks_pinned} chunks pinned by mounted images kept")
        return
    click.echo(f"regional store: {verb} {r.chunks_collected} chunks, {r.bytes_collected / 1e6:.1f} MB reclaimed "
               f"({r.bytes_collected} bytes), and {r.blobs_collected} blob records; {r.live_chunks} live chunks "
               f"reached from {r.names} names, {r.tags} tags and {r.leases} mount leases; {r.chunks_kept_recent} "
               f"unreferenced chunks kept as recent (a push under way); {r.seconds:.1f} s")


@main.command()
@_setting("region")
def images() -> None:
    """The images published in the regional store, and those a mirror is converting or failed to convert."""
    import asyncio
    import datetime

    from imagestream.rpc.client import GrpcImageNames, GrpcMirrors

    async def fetch():  # type: ignore[no-untyped-def]
        names, mirrors = GrpcImageNames(config.get("region")), GrpcMirrors(config.get("region"))
        try:
            return await names.list(), await mirrors.conversions()
        finally:
            await names.close()
            await mirrors.close()

    try:
        found, conversions = asyncio.run(fetch())
    except ImagestreamError as e:
        _fail(e)
    published = {i.name for i in found}
    click.echo(f"{'NAME':32} {'INDEX':14} {'SIZE':>10} {'CHUNKS':>7}  {'PUBLISHED':19}  STATE")
    for i in found:
        when = datetime.datetime.fromtimestamp(i.published_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{i.name:32} {i.index.hash[:12]:14} {i.content_bytes / 1e6:8.1f}MB {i.chunk_count:7}  {when:19}  ready")
    for c in conversions:  # a mirror's images not published (yet): converting, or why not
        if c.name in published:
            continue
        state = f"converting {c.percent}%" if c.state == "converting" else \
            f"failed: {c.error or 'its converter stopped'}" if c.state == "failed" else c.state
        click.echo(f"{c.name:32} {'-':14} {'-':>10} {'-':>7}  {'-':19}  {state}")


@main.command()
@click.argument("name")
@_setting("region")
def rm(name: str) -> None:
    """Remove the name NAME and its tag on the regional OCI endpoint (containerd can no longer pull it). Its
    chunks and blobs stay until `imagestream gc` collects what no other image shares."""
    import asyncio

    from imagestream.rpc.client import GrpcImageNames

    from imagestream.errors import NotFound
    from imagestream_cli import pull

    async def delete() -> tuple[bool, str]:
        names = GrpcImageNames(config.get("region"))
        try:
            try:
                index = (await names.resolve(name)).index.hash
            except NotFound:
                index = ""
            return await names.delete(name), index
        finally:
            await names.close()

    try:
        deleted, index = asyncio.run(delete())
        if not deleted:
            _fail(ImagestreamError(f"no image named {name!r}"))
    except ImagestreamError as e:
        _fail(e)
    # this node's full pull of it goes too (another name may share the index: it is pulled again if run)
    if index and pull.remove_pulled(index):
        click.echo(f"removed the full pull of {name} from this node")
    click.echo(f"removed {name}")


@main.group()
def mirror() -> None:
    """Pull-through conversion: the regional OCI endpoint fronts an upstream registry; a pull of
    REGIONAL/PREFIX/REPOSITORY:TAG is served from the upstream the first time and converted, then streams."""


@mirror.command("add")
@click.argument("upstream")
@_setting("region")
@click.option("--repository", "prefix", default="", metavar="PREFIX",
              help="serve the upstream's repositories under PREFIX/ (default: the upstream's host, ':' as '-')")
@click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
              help="trust this CA (PEM) for the upstream's TLS certificate")
@click.option("--plain-http", is_flag=True, help="the upstream speaks plain HTTP (a local registry)")
def mirror_add(upstream: str, prefix: str, ca_file: str | None, plain_http: bool) -> None:
    """Front the registry UPSTREAM (HOST[:PORT]). Its login is read from Docker's config.json as `push REF`
    reads it, and kept by the regional tier, which checks that it can log in before it adds the mirror."""
    from imagestream.rpc.client import GrpcMirrors
    from imagestream.v1 import mirror_pb2
    from imagestream.ingest.registry import credentials

    try:
        host = upstream.removeprefix("https://").removeprefix("http://").rstrip("/")
        login = credentials(host)
        ca_pem = pathlib.Path(ca_file).read_text() if ca_file else ""
    except (OSError, UnicodeDecodeError) as e:
        _fail(ImagestreamError(f"--ca-file {ca_file}: {getattr(e, 'strerror', None) or e}"))
    except ImagestreamError as e:
        _fail(e)
    request = mirror_pb2.AddMirrorRequest(upstream=host, prefix=prefix, plain_http=plain_http, ca_pem=ca_pem,
                                          username=login[0] if login else "", password=login[1] if login else "")
    m = _ask(lambda: GrpcMirrors(config.get("region")), lambda mirrors: mirrors.add(request))
    who = f"as {m.username}" if m.username else "anonymously"
    click.echo(f"mirror {m.prefix}/ -> {m.upstream} ({'plain HTTP' if m.plain_http else 'TLS'}, logged in {who}): "
               f"pull REGIONAL/{m.prefix}/REPOSITORY:TAG")


@mirror.command("ls")
@_setting("region")
def mirror_ls() -> None:
    """The mirrors of the regional OCI endpoint."""
    from imagestream.rpc.client import GrpcMirrors

    found = _ask(lambda: GrpcMirrors(config.get("region")), lambda mirrors: mirrors.list())
    click.echo(f"{'PREFIX':32} {'UPSTREAM':32} {'TLS':10} LOGIN")
    for m in found:
        tls_ = "plain-http" if m.plain_http else "custom CA" if m.custom_ca else "system CAs"
        click.echo(f"{m.prefix:32} {m.upstream:32} {tls_:10} {m.username or '-'}")


@mirror.command("rm")
@click.argument("prefix")
@_setting("region")
def mirror_rm(prefix: str) -> None:
    """Stop fronting the upstream of PREFIX (the images converted from it stay, as names like any other)."""
    from imagestream.rpc.client import GrpcMirrors

    if not _ask(lambda: GrpcMirrors(config.get("region")), lambda mirrors: mirrors.remove(prefix)):
        _fail(ImagestreamError(f"no mirror of prefix {prefix!r}"))
    click.echo(f"removed mirror {prefix}")


# -- node -------------------------------------------------------------------

@main.command()
@_setting("fuse_socket")
@click.argument("name")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_setting("node_cache_socket")
@click.option("--wait", is_flag=True, help="then show the background download and return once it is complete")
@click.option("--no-download", is_flag=True, help="stream only: do not fetch the whole image in the background")
def mount(name: str, mountpoint: str, wait: bool, no_download: bool) -> None:
    """Mount image NAME read-only on MOUNTPOINT (fetches only its index; the rest downloads in the background)."""
    from fuse_client import mounts

    if wait and no_download:
        _fail(click.UsageError("--wait and --no-download exclude each other"))
    try:
        m = mounts.mount(name, mountpoint, download=not no_download)
    except ImagestreamError as e:
        _fail(e)
    click.echo(f"mounted {name} on {m.mountpoint} (attached in {m.mount_seconds:.3f} s): ImageStreaming engaged "
               f"(the node's FUSE client, pid {m.pid}, serves it from {m.source})")
    if wait:
        _wait_for_download(m.download_id)


def _node_status():  # type: ignore[no-untyped-def]
    from imagestream.rpc.client import node_status

    return node_status()


def _wait_for_download(mount_id: str) -> None:
    """A progress bar until every chunk of the image of the background download `mount_id` is on this node."""
    import time

    from tqdm import tqdm

    bar = None
    while True:
        download = next((d for d in _node_status().downloads if d.mount_id == mount_id), None)
        if download is not None and download.chunks_total:
            if bar is None:
                bar = tqdm(total=download.bytes_total, unit="B", unit_scale=True, desc="download")
            bar.update(download.bytes_local - bar.n)
            if download.done or download.stalled:
                bar.close()
                if download.stalled:
                    click.echo(f"download stalled: {download.stalled} (streaming goes on)", err=True)
                return
        time.sleep(0.2)


@main.command()
@_setting("fuse_socket")
@_setting("node_cache_socket")
@_setting("zonal_cache_metrics")
@_setting("chunk_store_metrics")
def status() -> None:
    """This node: mounts, their background download, and each tier's hits and size."""
    from fuse_client import mounts

    try:
        node = _node_status()
    except ImagestreamError as e:
        _fail(e)
    from fuse_client import attach

    downloads = {d.mount_id: d for d in node.downloads}
    try:
        attached, root, pid = attach.attachments()
    except ImagestreamError as e:
        attached, root, pid = [], f"(not served: {e})", 0
    click.echo(f"IMAGES  attached in {root}" + (f" (FUSE client pid {pid})" if pid else ""))
    bound = {m.source: m.mountpoint for m in mounts.list_mounts()}
    for a in attached:
        d = downloads.get(a.download_id)
        if d is None or not d.chunks_total:
            progress = "streaming (download not started)"
        else:
            pct = 100 * d.bytes_local / d.bytes_total if d.bytes_total else 100
            progress = (f"{d.chunks_local}/{d.chunks_total} chunks, {d.bytes_local / 1e6:.1f}/{d.bytes_total / 1e6:.1f} MB "
                        f"({pct:.0f}%), {d.rate_bytes_per_s / 1e6:.1f} MB/s"
                        + (", complete: all reads local" if d.done else "") + (f", stalled: {d.stalled}" if d.stalled else ""))
        shown = f"  on {bound[a.path]}" if a.path in bound else ""
        click.echo(f"  {a.image}  {a.path}{shown}  {len(a.leases)} lease(s)  ImageStreaming engaged  {progress}")
    if not attached:
        click.echo("  (none)")
    click.echo("TIERS")
    for t in node.tiers:
        total = t.hits + t.misses
        ratio = f"{100 * t.hits / total:.0f}%" if total else "-"
        cap = f" of {t.capacity_bytes / 1e6:.0f} MB" if t.capacity_bytes else ""
        click.echo(f"  {t.tier:12} hit ratio {ratio:>5} ({t.hits} hits, {t.misses} misses), "
                   f"{t.size_bytes / 1e6:.1f} MB{cap}, {t.evictions} evictions")
    for service, tier in (("zonal_cache", "zonal"), ("chunk_store", "regional")):
        hits, misses = _tier_counts(config.get(f"{service}_metrics"), tier)
        if hits is None:
            click.echo(f"  {tier:12} (metrics at {config.get(f'{service}_metrics')} not reachable)")
            continue
        total = hits + misses
        ratio = f"{100 * hits / total:.0f}%" if total else "-"
        click.echo(f"  {tier:12} hit ratio {ratio:>5} ({hits:.0f} hits, {misses:.0f} misses)")
    click.echo(f"  upstream     {node.blocking_fetches} blocking fetches, {node.background_fetches} background fetches, "
               f"{node.pinned_chunks} chunks pinned by mounts")


def _tier_counts(address: str, tier: str) -> tuple[float | None, float]:
    """(hits, misses) of a tier, read from its service's Prometheus endpoint."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None, 0
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        for result in counts:
            if line.startswith(f'imagestream_chunk_requests_total{{result="{result}",tier="{tier}"}}'):
                counts[result] = float(line.rsplit(" ", 1)[1])
    return counts["hit"], counts["miss"]


@main.command()
@_setting("fuse_socket")
@click.argument("mountpoint", type=click.Path())
def umount(mountpoint: str) -> None:
    """Unmount an image mounted with `imagestream mount`."""
    from fuse_client import mounts

    try:
        mounts.unmount(mountpoint)
    except ImagestreamError as e:
        _fail(e)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_setting("fuse_socket")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--env", "-e", "env", multiple=True, help="NAME=VALUE (or NAME to pass the caller's) for the command")
@click.option("--keep", is_flag=True, help="keep the run's writable upper directory")
@click.option("--network", type=click.Choice(["none", "host"]), default="none", show_default=True,
              help="none: a network namespace of its own (loopback only); host: share this node's network")
@_setting("node_cache_socket")
@_setting("streaming")
def run(name: str, command: tuple[str, ...], env: tuple[str, ...], keep: bool, network: str) -> None:
    """Run COMMAND in image NAME as a container (runc): streamed mount under a writable overlay, its own
    PID, IPC, UTS, mount and network namespaces, default capabilities, no_new_privs, a seccomp allowlist.

    Exits with the command's status.  Example: imagestream run debian-python -- python3 -c 'print(1)'
    """
    from imagestream_cli import sandbox

    sandbox.run_command(name, list(command), list(env), keep=keep, network=network)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_setting("fuse_socket")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_setting("node_cache_socket")
def profile(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in image NAME on purpose to record its startup profile (replacing any earlier one).

    Later cold mounts fetch the profiled chunks first, in parallel, right after mounting.
    """
    from imagestream_cli import sandbox

    if os.geteuid() != 0:
        _fail(RuntimeError("profile needs root (mount namespaces, overlayfs, runc)"))
    os.environ[config.SETTINGS["profile"].env] = "always"
    command = command[1:] if command[:1] == ("--",) else command
    try:
        code = sandbox.run(name, list(command))
    except ImagestreamError as e:
        _fail(e)
    click.echo(f"startup profile of {name} recorded (command exited {code})")
    sys.exit(0 if code == 0 else code)


# -- images for trying it out (developer tooling) --------------------------------

@stack.command("build-debian")
@click.argument("out", type=click.Path(path_type=pathlib.Path))
@click.option("--format", "fmt", type=click.Choice(["oci", "oci-archive", "docker"]), default="oci", show_default=True)
@click.option("--filler-mb", type=int, default=0, help="add this much data the command never reads (/opt/filler)")
@click.option("--large", is_flag=True, help="about 1.6 GB of packages instead: a JDK, numpy, scipy, pandas, ...")
def build_debian(out: pathlib.Path, fmt: str, filler_mb: int, large: bool) -> None:
    """Build a real Debian bookworm image with python3 (debootstrap, cached) and write it to OUT."""
    from imagestream_dev import imagebuild

    cache = pathlib.Path(config.get("cache_dir")).absolute()
    if large and filler_mb:
        raise click.UsageError("--large and --filler-mb do not go together")
    path = (imagebuild.build_debian_large(cache, out, fmt=fmt) if large
            else imagebuild.build_debian_python(cache, out, fmt=fmt, filler_mb=filler_mb))
    click.echo(str(path))


if __name__ == "__main__":
    from imagestream_cli.entry import guarded

    guarded(lambda: main(standalone_mode=True))
