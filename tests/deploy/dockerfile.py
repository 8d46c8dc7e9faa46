"""The repository's Dockerfile as data: its stages, their instructions, what a target copies and runs.

No Docker engine here, so the Dockerfile is checked by reading it: enough of the syntax for ours
(line continuations, comments, FROM ... AS ..., JSON-form CMD/ENTRYPOINT/HEALTHCHECK).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclasses.dataclass
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        """A JSON-array argument (CMD ["a", "b"]), or the words of a shell-form one."""
        text = self.value.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


def parse(path: pathlib.Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name)."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", value.strip(), flags=re.I)
            assert m, f"FROM without a stage name: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            stage = stages[m.group(2)] = Stage(m.group(2), base, [])
        elif stage is None:
            if keyword == "ARG":
                name, _, default = value.partition("=")
                args[name.strip()] = default.strip()
        else:
            stage.instructions.append(Instruction(keyword, value))
    return args, stages


def chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The stages a target is built from, base first (FROM another stage)."""
    found = []
    name: str | None = target
    while name in stages:
        found.insert(0, stages[name])
        name = stages[name].base
    return found


def copied_from_context(stages: dict[str, Stage], target: str) -> set[str]:
    """The build-context paths a target's COPY instructions read (its own chain and the stages it copies from)."""
    sources: set[str] = set()
    seen: set[str] = set()
    todo = [target]
    while todo:
        for stage in chain(stages, todo.pop()):
            if stage.name in seen:
                continue
            seen.add(stage.name)
            for copy in stage.all("COPY"):
                words = shlex.split(copy.value)
                options = [w for w in words if w.startswith("--")]
                from_stage = [o.split("=", 1)[1] for o in options if o.startswith("--from=")]
                paths = [w for w in words if not w.startswith("--")][:-1]
                if from_stage:
                    todo.append(from_stage[0])
                else:
                    sources.update(p.rstrip("/") for p in paths)
    return sources


def final_command(stages: dict[str, Stage], target: str) -> list[str]:
    """ENTRYPOINT + CMD of a target, as Docker runs them."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for stage in chain(stages, target):
        for i in stage.instructions:
            if i.keyword == "ENTRYPOINT":
                entrypoint, cmd = i.exec_form(), []
            elif i.keyword == "CMD":
                cmd = i.exec_form()
    return entrypoint + cmd


def env(stages: dict[str, Stage], target: str) -> dict[str, str]:
    """The ENV of a target (KEY=VALUE pairs, several per instruction)."""
    found: dict[str, str] = {}
    for stage in chain(stages, target):
        for i in stage.all("ENV"):
            for word in shlex.split(i.value):
                key, _, value = word.partition("=")
                found[key] = value
    return found


def python_module(argv: list[str]) -> str | None:
    """X for a command line that runs `python -m X` (after an init such as `tini --`)."""
    for i, word in enumerate(argv[:-2]):
        if re.fullmatch(r"python3?(\.\d+)?", pathlib.Path(word).name) and argv[i + 1] == "-m":
            return argv[i + 2]
    return None
