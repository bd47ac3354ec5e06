"""nvmetcli's config.json (`/etc/nvmet/config.json`) to and from our model.

nvmetcli dumps each configfs node's writable attribute files by group prefix (`attr_`, `addr_`, `param_`,
`device_`, `dhchap_`, `ana_`, `resv_`, `discovery_`), values as the strings the kernel prints. Export writes that
full form (what nvmetcli saves from a 6.12 kernel), so a full nvmetcli file survives import -> export unchanged.
Older, partial files import too; they export in the full form.
"""

from __future__ import annotations

from typing import Any

from target.model import TargetState, parse_state

DHCHAP_DEFAULTS = {"ctrl_key": "", "dhgroup": "null", "hash": "hmac(sha256)", "key": ""}
SUBSYS_ATTRS = ("allow_any_host", "cntlid_max", "cntlid_min", "firmware", "ieee_oui", "model", "pi_enable",
                "qid_max", "serial", "version")
PORT_ADDR = ("adrfam", "traddr", "treq", "trsvcid", "trtype", "tsas")
PORT_PARAM_DEFAULTS = {"inline_data_size": "-1", "max_queue_size": "-1", "pi_enable": "0"}
REFERRAL_ADDR = ("adrfam", "portid", "traddr", "treq", "trsvcid", "trtype")


def _none_if(value: Any, *empty: str) -> Any:
    return None if value in empty else value


def _bool(value: Any) -> bool:
    return str(value).strip() in ("1", "true", "True")


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def import_config(config: dict[str, Any]) -> TargetState:
    """Parse nvmetcli JSON into a validated TargetState (StateError names the offending field)."""
    hosts = []
    for h in config.get("hosts", []):
        d = h.get("dhchap", {})
        hosts.append({"nqn": h.get("nqn"), "dhchap_key": _none_if(d.get("key"), ""),
                      "dhchap_ctrl_key": _none_if(d.get("ctrl_key"), ""),
                      "dhchap_hash": _none_if(d.get("hash"), ""), "dhchap_dhgroup": _none_if(d.get("dhgroup"), "")})
    subsystems = []
    for s in config.get("subsystems", []):
        a = s.get("attr", {})
        sub: dict[str, Any] = {
            "nqn": s.get("nqn"), "allowed_hosts": list(s.get("allowed_hosts", [])),
            "allow_any_host": _bool(a.get("allow_any_host", "0")),
            "serial": a.get("serial"), "model": a.get("model"), "firmware": a.get("firmware"),
            "ieee_oui": a.get("ieee_oui"), "version": a.get("version"),
            "cntlid_min": _int(a.get("cntlid_min")), "cntlid_max": _int(a.get("cntlid_max")),
            "qid_max": _int(a.get("qid_max")),
            "pi_enable": None if a.get("pi_enable") is None else _bool(a["pi_enable"]),
            "namespaces": [],
        }
        for n in s.get("namespaces", []):
            dev = n.get("device", {})
            grpid = n.get("ana_grpid", n.get("ana", {}).get("grpid", 1))
            resv = n.get("resv", {}).get("enable")
            sub["namespaces"].append({
                "nsid": n.get("nsid"), "device_path": _none_if(dev.get("path"), "(null)", ""),
                "device_uuid": dev.get("uuid"), "device_nguid": dev.get("nguid"),
                "enable": _bool(n.get("enable", 1)), "ana_grpid": int(grpid),
                "buffered_io": _bool(n.get("buffered_io", 0)),
                "resv_enable": None if resv is None else _bool(resv),
            })
        for p in _passthru(s.get("passthru"))[:1]:
            sub["passthru"] = {"device_path": (p.get("device") or {}).get("path", p.get("device_path")),
                               "enable": _bool(p.get("enable", 1)),
                               "admin_timeout": _int(p.get("admin_timeout")), "io_timeout": _int(p.get("io_timeout")),
                               "clear_ids": None if p.get("clear_ids") is None else _bool(p["clear_ids"])}
        subsystems.append(sub)
    ports = []
    for p in config.get("ports", []):
        addr, param = p.get("addr", {}), p.get("param", {})
        ports.append({
            "id": p.get("portid"), "trtype": addr.get("trtype"), "adrfam": addr.get("adrfam", ""),
            "traddr": addr.get("traddr", ""), "trsvcid": addr.get("trsvcid", ""), "treq": addr.get("treq"),
            "tsas": _none_if(addr.get("tsas"), ""),
            "inline_data_size": _int(param.get("inline_data_size")),
            "max_queue_size": _int(param.get("max_queue_size")),
            "pi_enable": None if param.get("pi_enable") is None else _bool(param["pi_enable"]),
            "subsystems": list(p.get("subsystems", [])),
            "ana_groups": [{"grpid": g.get("grpid"), "state": g.get("ana", {}).get("state", "optimized")}
                           for g in p.get("ana_groups", [])],
            "referrals": [{"name": r.get("name"), "enable": _bool(r.get("enable", 1)),
                           "trtype": r.get("addr", {}).get("trtype"), "adrfam": r.get("addr", {}).get("adrfam", ""),
                           "traddr": r.get("addr", {}).get("traddr", ""),
                           "trsvcid": r.get("addr", {}).get("trsvcid", ""), "treq": r.get("addr", {}).get("treq"),
                           "portid": int(r.get("addr", {}).get("portid", 0))}
                          for r in p.get("referrals", [])],
        })
    discovery = config.get("discovery", {}).get("nqn")
    return parse_state({"discovery_nqn": discovery, "hosts": hosts, "subsystems": subsystems, "ports": ports})


def _passthru(value: Any) -> list[dict[str, Any]]:
    """A subsystem's passthru entries that name a device. nvmetcli saves `"passthru": [{"device": {"path":
    "(null)"}, "enable": 0, ...}]` for every subsystem of a kernel built with passthru (6.12: what configfs shows
    when no device is set), which means no passthru; a lone object instead of a list is taken as one entry."""
    entries = [value] if isinstance(value, dict) else list(value or [])
    return [p for p in entries if isinstance(p, dict)
            and _none_if((p.get("device") or {}).get("path", p.get("device_path")), "(null)", "") is not None]


def _s(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# what nvmetcli's save writes for a subsystem without passthru on a kernel built with it (6.12, seen in the rig)
NO_PASSTHRU = {"admin_timeout": 0, "clear_ids": 0, "device": {"path": "(null)"}, "io_timeout": 0}


def export_config(state: TargetState, passthru_placeholder: bool = False) -> dict[str, Any]:
    """The nvmetcli JSON for `state` (keys sorted the way nvmetcli's `json.dumps(sort_keys=True)` writes them).

    `passthru_placeholder`: the kernel has a passthru directory in every subsystem, so write what nvmetcli's save
    writes there when none is set, and the export is the very file nvmetcli would save."""
    out: dict[str, Any] = {}
    if state.discovery_nqn is not None:
        out["discovery"] = {"nqn": state.discovery_nqn}
    out["hosts"] = [{"dhchap": {"ctrl_key": h.dhchap_ctrl_key or "", "dhgroup": h.dhchap_dhgroup or "null",
                                "hash": h.dhchap_hash or "hmac(sha256)", "key": h.dhchap_key or ""},
                     "nqn": h.nqn} for h in state.hosts]
    out["ports"] = []
    for p in state.ports:
        addr = {"adrfam": p.adrfam, "traddr": p.traddr, "treq": p.treq or "not specified", "trsvcid": p.trsvcid,
                "trtype": p.trtype, "tsas": p.tsas or ""}
        param = dict(PORT_PARAM_DEFAULTS)
        for key in param:
            if getattr(p, key) is not None:
                param[key] = _s(getattr(p, key))
        groups = {g.grpid: g.state for g in p.ana_groups}
        groups.setdefault(1, "optimized")
        out["ports"].append({
            "addr": addr, "ana_groups": [{"ana": {"state": st}, "grpid": gid} for gid, st in sorted(groups.items())],
            "param": param, "portid": p.id,
            "referrals": [{"addr": {"adrfam": r.adrfam, "portid": str(r.portid), "traddr": r.traddr,
                                    "treq": r.treq or "not specified", "trsvcid": r.trsvcid, "trtype": r.trtype},
                           "enable": int(r.enable), "name": r.name} for r in p.referrals],
            "subsystems": list(p.subsystems),
        })
    out["subsystems"] = []
    for s in state.subsystems:
        attr = {k: _s(getattr(s, k)) for k in SUBSYS_ATTRS if getattr(s, k) is not None}
        sub: dict[str, Any] = {"allowed_hosts": list(s.allowed_hosts), "attr": attr, "namespaces": [], "nqn": s.nqn}
        for n in s.namespaces:
            device = {"path": n.device_path or "(null)"}
            if n.device_nguid is not None:
                device["nguid"] = n.device_nguid
            if n.device_uuid is not None:
                device["uuid"] = n.device_uuid
            ns: dict[str, Any] = {"ana": {"grpid": str(n.ana_grpid)}, "ana_grpid": n.ana_grpid, "device": device,
                                  "enable": int(n.enable), "nsid": n.nsid,
                                  "resv": {} if n.resv_enable is None else {"enable": _s(n.resv_enable)}}
            if n.buffered_io:
                ns["buffered_io"] = 1
            sub["namespaces"].append(ns)
        if s.passthru is not None:
            pt = s.passthru
            sub["passthru"] = [{"admin_timeout": pt.admin_timeout or 0, "clear_ids": int(bool(pt.clear_ids)),
                                "device": {"path": pt.device_path}, "enable": int(pt.enable),
                                "io_timeout": pt.io_timeout or 0}]
        elif passthru_placeholder:
            sub["passthru"] = [dict(NO_PASSTHRU, device=dict(NO_PASSTHRU["device"]))]
        out["subsystems"].append(sub)
    return out
