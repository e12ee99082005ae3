"""Prompt templates and class-name lists for zero-shot classification.

A template file holds one prompt per line with "{}" where the class name goes ("a photo of a {}.");
blank lines and lines starting with "#" are skipped. Built-in sets live in clip_train/evaluation/templates/:
"single" (the CLIP paper's "a photo of a {}.") and "imagenet80" (the paper's 80 ImageNet prompts).
`load_templates` also takes one template written inline ("a photo of the number {}."): any string holding
"{}" that is not an existing file.
A class-name file holds one class name per line, in label order (line i names label i).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = "{}"


class TemplateError(ValueError):
    """A template or class-name list that cannot be used; the message names the file and line."""


def builtin_template_sets() -> list[str]:
    """Names of the template sets shipped with the package ("imagenet80", "single")."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines of a UTF-8 file."""
    if not _is_file(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{what} file {path} is not UTF-8 text: {exc}") from exc
    return [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _problem(template: str) -> str | None:
    rest = template.replace(PLACEHOLDER, "")
    if template.count(PLACEHOLDER) != 1 or "{" in rest or "}" in rest:
        return (
            f"template {template!r} must contain exactly one {PLACEHOLDER!r} (where the class name goes) "
            "and no other braces"
        )
    return None


def check_templates(templates: list[str], source: str = "templates") -> list[str]:
    """Return `templates` after checking each holds exactly one "{}" and no other braces."""
    if not templates:
        raise TemplateError(f"{source}: no templates given")
    for i, template in enumerate(templates):
        problem = _problem(template)
        if problem:
            raise TemplateError(f"{source}, entry {i + 1}: {problem}")
    return list(templates)


def load_templates(spec: str | Path) -> list[str]:
    """The templates `spec` names: a built-in set ("single", "imagenet80"), a template file, or one template
    written inline ("a photo of the number {}."), which is a string holding "{}" that is not an existing
    file. Raises FileNotFoundError when `spec` is none of these, `TemplateError` for a bad template."""
    builtin = TEMPLATE_DIR / f"{spec}.txt"
    is_builtin = isinstance(spec, str) and "/" not in spec and _is_file(builtin)
    path = builtin if is_builtin else Path(spec)
    if not is_builtin and not _is_file(path):
        if isinstance(spec, str) and PLACEHOLDER in spec:
            problem = _problem(spec)
            if problem:
                raise TemplateError(f"inline template: {problem}")
            return [spec]
        raise FileNotFoundError(
            f"template file not found: {path} (built-in sets: {', '.join(builtin_template_sets())}; or one "
            f'template inline, with {PLACEHOLDER} where the class name goes: "a photo of a {PLACEHOLDER}.")'
        )
    lines = _read_lines(path, "template")
    if not lines:
        raise TemplateError(f"template file {path} holds no templates")
    for n, template in lines:
        problem = _problem(template)
        if problem:
            raise TemplateError(f"{path}:{n}: {problem}")
    return [t for _, t in lines]


def _is_file(path: Path) -> bool:
    # An inline template longer than the file system's name limit makes stat fail (ENAMETOOLONG), and one
    # holding a NUL byte is refused by os.stat with ValueError: neither is a file.
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def fill_templates(classname: str, templates: list[str]) -> list[str]:
    """The prompts of one class: each template with "{}" replaced by the class name."""
    return [t.replace(PLACEHOLDER, classname) for t in templates]


def check_classnames(classnames: list[str], source: str = "class names") -> list[str]:
    """Return `classnames` after checking the list is non-empty, without blanks or duplicates."""
    if not classnames:
        raise TemplateError(f"{source}: the class list is empty")
    blank = [i for i, c in enumerate(classnames) if not str(c).strip()]
    if blank:
        raise TemplateError(f"{source}: class names at positions {blank[:10]} are blank")
    seen: set[str] = set()
    duplicates = [c for c in classnames if c in seen or seen.add(c)]
    if duplicates:
        raise TemplateError(f"{source}: class names listed twice: {sorted(set(duplicates))[:10]}")
    return list(classnames)


def load_classnames(path: str | Path) -> list[str]:
    """Class names from a file, one per line in label order."""
    path = Path(path)
    return check_classnames([c for _, c in _read_lines(path, "class-name")], str(path))
