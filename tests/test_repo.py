"""Repository invariants: the README's commands are the ones CI runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    commands = [line.strip() for line in ci.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 1, "CI must run exactly one install-and-test command"
    assert commands[0] in readme, "the README's test command and .ci/run's have drifted apart"
    assert "pytest" in commands[0]


def test_version_stays_below_what_transformers_takes_for_flute_kernel():
    import flute
    major, minor, patch = (int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", flute.__version__).groups())
    assert (major, minor, patch) < (0, 4, 1)


def test_readme_repository_map_names_every_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    repo_map = readme[readme.index("## Repository map"):]
    modules = [f[:-3] for f in os.listdir(os.path.join(ROOT, "flute"))
               if f.endswith(".py") and not f.startswith("__")]
    missing = [m for m in modules if not re.search(rf"\b{m}(\.py)?\b", repo_map)]
    assert not missing, f"the README's repository map omits {missing}"


def _heading_anchors(text):
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in text.splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_docs_links_and_anchors_resolve():
    """Every relative link of the README and docs/*.md names a file that exists and, where it has
    a #fragment into a Markdown file, a heading of that file (the CPU history moved to docs/)."""
    files = ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                             if f.endswith(".md")]
    checked = 0
    for name in files:
        src = os.path.join(ROOT, name)
        for link in re.findall(r"\]\(((?!http)[^)\s]+)\)", open(src).read()):
            target, _, fragment = link.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(src), target)) if target else src
            assert os.path.exists(path), f"{name}: {link}"
            if fragment and path.endswith(".md"):
                assert fragment in _heading_anchors(open(path).read()), f"{name}: {link}"
                checked += 1
    assert checked >= 3
