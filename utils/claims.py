"""Work sharing without a scheduler: drivers pointed at one store claim each unit of work (a subset plan's
group, a sweep's cell) before doing it.

A claim is a file `claims/group_NNNNNN.json` (a sweep's cell: `claims/KEY.json`) naming the plan, the driver
and its host, created atomically with its content: written under a name of this driver's own, then
hard-linked to the claim's name, which fails if the name exists (as O_CREAT | O_EXCL would, and a shared file
system such as NFS honours both). A claim created empty and then written would stay empty if its driver were
killed in between, and an empty claim cannot name a dead driver. While a driver works it touches its claims
every `timeout / 4` seconds; a claim untouched for `timeout` seconds belongs to a driver that died, and the
first driver to rename it away takes the work over (only one can: `_take_over`). A finished unit's claim is
removed, and files left by killed drivers are removed once stale (`clean_leftovers`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from utils.errors import ConfigError


def driver_gone(driver: str) -> bool:
    """A driver id `host:pid:token` of this host whose process no longer exists (killed with -9, say)."""
    host, _, rest = driver.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's driver: only its claims' age tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Claims:
    """This driver's claims on the groups of one plan in one store."""

    def __init__(self, store_folder: Path, plan_hash: str, timeout: float):
        self.folder = Path(store_folder) / "claims"
        self.plan_hash = plan_hash
        self.timeout = timeout
        self.driver = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tag = self.driver.replace(":", "-")  # the driver in this driver's own file names
        self.held: set[int | str] = set()
        self.fresh: list[Path] = []  # other files this driver keeps touched while it lives
        self._lock = threading.Lock()
        self._stop = threading.Event()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{self._tag}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"cannot write claims into {self.folder} ({error.strerror or error}); make the store "
                              f"writable, or give --out a folder this driver can write") from None
        for path in sorted(self.folder.glob("*.json")):  # before any work, not when the group comes up
            self._check_plan(path)
        self._heartbeat = threading.Thread(target=self._touch_held, daemon=True)
        self._heartbeat.start()

    def path(self, group: int | str) -> Path:
        """A group of a subset plan by its index; any other unit of work (a sweep's cell) by its name."""
        return self.folder / (f"group_{group:06d}.json" if isinstance(group, int) else f"{group}.json")

    def _owner_plan(self, path: Path) -> str | None:
        try:
            return json.loads(path.read_text()).get("plan_hash")
        except (OSError, ValueError, AttributeError):
            return None  # being written, or removed meanwhile: not another plan's

    def _check_plan(self, path: Path) -> None:
        plan = self._owner_plan(path)
        if plan is not None and plan != self.plan_hash:
            raise ConfigError(f"{path} claims a group for another plan ({plan}); this store's plan is "
                              f"{self.plan_hash}: remove {self.folder} if no driver of that plan runs")

    def _create(self, path: Path) -> None:
        """The claim file at `path`, with its content, or FileExistsError."""
        content = json.dumps({"plan_hash": self.plan_hash, "driver": self.driver, "time": time.time()})
        written = path.with_name(f".{path.name}.{self._tag}")
        written.write_text(content)
        try:
            os.link(written, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: created, then written
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as file:
                file.write(content)
        finally:
            written.unlink(missing_ok=True)

    def claim(self, group: int | str) -> bool:
        """True if this driver now holds the group; False if another live driver does."""
        path = self.path(group)
        for _ in range(2):
            try:
                self._create(path)
            except FileExistsError:
                self._check_plan(path)
                if not self._take_over(path):
                    return False
                continue
            with self._lock:
                self.held.add(group)
            return True
        return False

    def _take_over(self, path: Path) -> bool:
        """Remove the claim at `path` if its driver is gone; True if this driver removed it.

        Two drivers may judge one stale claim at once. The claim is identified by its content (the driver's
        unique id and the claim's time, never rewritten): whoever renames away a claim other than the one it
        judged (the other driver's fresh claim, made in between) puts it back and loses."""
        try:
            judged = path.read_text()
        except FileNotFoundError:
            return True  # released meanwhile: try to create it
        except OSError:
            return False
        if not self._stale(path, judged):
            return False
        aside = path.with_name(f"{path.name}.stale-{self._tag}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False  # another driver took it over first
        if aside.read_text() != judged:
            try:
                os.link(aside, path)  # the same file again, so its owner's touches still reach it
            except FileExistsError:
                pass
            except OSError:
                os.replace(aside, path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink()
        return True

    def _stale(self, path: Path, content: str) -> bool:
        """Untouched for `timeout` seconds, or written by a driver of this host whose process is gone."""
        try:
            if time.time() - path.stat().st_mtime > self.timeout:
                return True
            return driver_gone(json.loads(content).get("driver", ""))
        except (OSError, ValueError, AttributeError):
            return False

    def clean_leftovers(self) -> list[Path]:
        """Remove what killed drivers left in the claims folder (claims being written, claims renamed away
        during a takeover) once untouched for `timeout` seconds; returns the removed paths."""
        removed = []
        for path in [*self.folder.glob(".*.json.*"), *self.folder.glob("*.json.stale-*")]:
            try:
                if time.time() - path.stat().st_mtime > self.timeout:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass
        return removed

    def release(self, group: int | str) -> None:
        with self._lock:
            self.held.discard(group)
        self.path(group).unlink(missing_ok=True)

    def keep_fresh(self, path: Path) -> None:
        """Touch `path` with the claims, so that other drivers see this driver is alive."""
        self.fresh.append(Path(path))

    def close(self) -> None:
        """Stop touching claims and files; those still held (a killed run) go stale and are taken over later."""
        self._stop.set()
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join()

    def _touch_held(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            with self._lock:
                held = list(self.held)
            for path in [self.path(group) for group in held] + self.fresh:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass
