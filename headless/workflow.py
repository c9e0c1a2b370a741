"""Workflows for a ComfyUI without its frontend: UI format (what the frontend saves) → API prompt (what it queues).

``workflow_to_prompt`` mirrors the frontend's ``graphToPrompt`` for the graphs EraseKit ships: widget values
are assigned to the node's widget inputs in definition order (a ``control_after_generate`` input owns one
extra, non-serialised value right after its own; an ``image_upload`` input's button owns one after all the
others), links override widgets, reroutes and primitive nodes are resolved, muted nodes are dropped and
bypassed nodes are passed through by type. ``tests/comfy/test_frontend.py`` checks it against the real
frontend in headless Chromium.

Plain data in, plain data out: ``object_info`` is what ComfyUI's ``GET /object_info`` returns, so nothing here
imports ComfyUI.
"""
import json
from pathlib import Path

VIRTUAL_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(ValueError):
    pass


def _input_spec(info, name):
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            return spec
    return None


def _is_widget(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if options.get("forceInput") or options.get("rawLink"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_names(info):
    """Widget names in the order the frontend creates them, with None for value-only helper widgets."""
    names, trailing = [], []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = _input_spec(info, name)
            if spec is None or not _is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            names.append(name)
            control = options.get("control_after_generate")
            if control is None:  # the frontend's legacy rule: INT inputs named seed/noise_seed get one too
                control = spec[0] == "INT" and name in ("seed", "noise_seed")
            if control:
                names.append(None)  # "fixed"/"randomize"/...: saved in the workflow, not sent
            if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
                trailing.append(None)  # the upload button: created after every other widget
    return names + trailing


def _widget_values(node, info):
    values = node.get("widgets_values", [])
    if isinstance(values, dict):
        return {k: v for k, v in values.items() if _input_spec(info, k) is not None}
    names = widget_names(info)
    if len(values) != len(names):  # the frontend would silently shift values into the wrong widgets
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values for "
                            f"{len(names)} widgets {names} (None = a seed control or upload button)")
    named = {}
    for name, value in zip(names, values):
        if name is not None:
            named[name] = value
    return named


def workflow_to_prompt(workflow, object_info):
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
        links[link[0]] = link

    def resolve(link_id):
        """(node, slot) that feeds this link after reroutes and bypasses, or a primitive's value."""
        seen = set()
        while link_id is not None and link_id not in seen:
            seen.add(link_id)
            link = links.get(link_id)
            if link is None:
                return None
            origin = nodes.get(link[1])
            if origin is None or origin.get("mode") == MODE_MUTED:
                return None
            kind = origin["type"]
            if kind == "Reroute":
                link_id = (origin.get("inputs") or [{}])[0].get("link")
                continue
            if kind == "PrimitiveNode":
                return ("value", (origin.get("widgets_values") or [None])[0])
            if origin.get("mode") == MODE_BYPASSED:
                link_id = _bypass_input(origin, link[2], link[5])
                continue
            return ("link", [str(origin["id"]), int(link[2])])
        return None

    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node['id']} has type {kind!r}, which this ComfyUI does not know (missing node)")
        inputs = {}
        for name, value in _widget_values(node, info).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            resolved = resolve(socket["link"])
            if resolved is None:
                continue
            name = socket.get("widget", {}).get("name") or socket["name"]
            inputs[name] = resolved[1]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": node.get("title") or info.get("display_name") or kind}}

    for entry in prompt.values():  # drop links to nodes that were removed (muted, virtual)
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _bypass_input(node, slot, kind):
    """The link of the bypassed node's input that passes its output ``slot`` of type ``kind`` through."""
    inputs = node.get("inputs") or []
    if slot < len(inputs) and inputs[slot].get("type") == kind and inputs[slot].get("link") is not None:
        return inputs[slot]["link"]
    for socket in inputs:
        if socket.get("type") == kind and socket.get("link") is not None:
            return socket["link"]
    return None


def declared_models(workflow, skip_modes=(MODE_MUTED,)):
    """The ``properties.models`` entries (name, url, directory) of the workflow's nodes, but those of nodes in
    ``skip_modes``."""
    for node in workflow["nodes"]:
        if node.get("mode") not in skip_modes:
            yield from node.get("properties", {}).get("models", [])


def model_files(workflow):
    """(folder, filename) of every model the workflow's loaders name, from their properties.models."""
    return [(model["directory"], model["name"]) for model in declared_models(workflow)]


def is_api_prompt(data):
    """True for an API-format prompt (``{"id": {"class_type", "inputs"}}``, the frontend's "Export (API)")."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v and "inputs" in v for v in data.values())


def load_workflow(path):
    """``(workflow or None, prompt or None)`` from a JSON file: a UI-format workflow or an API-format prompt."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"workflow file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkflowError(f"{path} is not a JSON workflow: {error}") from None
    if is_api_prompt(data):
        return None, data
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return data, None
    raise WorkflowError(f"{path} is neither a ComfyUI workflow (a 'nodes' list, as Save writes it) nor an API "
                        "prompt (node ids mapping to class_type + inputs, as Export (API) writes it)")


def parse_override(text):
    """``"[NODE.]INPUT=VALUE"`` → (node or None, input, value); VALUE is read as JSON when it parses, else as text.

    NODE is a node id, a node type (``KSampler``) or a node title; without it every node with that input is set."""
    target, sep, raw = text.partition("=")
    if not sep or not target.strip():
        raise WorkflowError(f"override {text!r} is not of the form [NODE.]INPUT=VALUE (for example steps=20 or "
                            "12.seed=7)")
    node, _, name = target.strip().rpartition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return (node or None), name, value


def apply_overrides(prompt, overrides):
    """Set inputs of an API prompt in place from ``[(node, input, value)]``; an override that matches no node
    input is an error naming it, so a typo never runs the workflow unchanged."""
    for node, name, value in overrides:
        hits = 0
        for node_id, entry in prompt.items():
            title = entry.get("_meta", {}).get("title")
            if node is not None and node not in (node_id, entry["class_type"], title):
                continue
            if name in entry["inputs"] and not isinstance(entry["inputs"][name], list):
                entry["inputs"][name] = value
                hits += 1
        if not hits:
            where = f"node {node!r}" if node else "any node"
            raise WorkflowError(f"override {name}={value!r}: {where} has no widget input named {name!r}")
    return prompt


def missing_models(workflow, find):
    """``[(folder, name, url)]`` of the models the workflow's loaders name (``properties.models``) that
    ``find(folder, name)`` (a path or None) cannot find."""
    return [(model["directory"], model["name"], model.get("url", ""))
            for model in declared_models(workflow, (MODE_MUTED, MODE_BYPASSED))
            if find(model["directory"], model["name"]) is None]
