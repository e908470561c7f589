"""The CLI surface of the foundation: help, list-cfg, copy-cfg and the error convention."""

import subprocess
import sys

import yaml

from tests.timeouts import TIMEOUT
from tunesmith.config import build_recipe
from tunesmith.config.load import validate


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)


def test_help_and_version():
    out = run("--help")
    assert out.returncode == 0 and "list-cfg" in out.stdout and "copy-cfg" in out.stdout
    assert "tunesmith copy-cfg internlm_chat_7b_qlora_oasst1_e3 ." in out.stdout
    assert run("--version").stdout.startswith("tunesmith ")


def test_list_cfg_pattern_is_case_insensitive():
    out = run("list-cfg", "-p", "OASST1")
    names = out.stdout.split()
    assert out.returncode == 0 and "internlm_chat_7b_qlora_oasst1_e3" in names
    assert all("oasst1" in n for n in names)


def test_copy_cfg_writes_loadable_yaml(tmp_path):
    out = run("copy-cfg", "internlm_chat_7b_qlora_oasst1_e3", str(tmp_path))
    assert out.returncode == 0, out.stderr
    target = tmp_path / "internlm_chat_7b_qlora_oasst1_e3_copy.yaml"
    assert validate(yaml.safe_load(target.read_text()), str(target)) == build_recipe(
        "internlm_chat_7b_qlora_oasst1_e3")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left behind


def test_user_error_is_one_line_exit_2(tmp_path):
    out = run("copy-cfg", "no_such_recipe", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: unknown config 'no_such_recipe'")
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir())


def test_debug_shows_traceback(tmp_path):
    out = run("copy-cfg", "no_such_recipe", str(tmp_path), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "TunesmithError" in out.stderr


def test_usage_error_exit_2():
    out = run("copy-cfg")
    assert out.returncode == 2 and "Missing argument" in out.stderr
