//! A Canvas drawn as a graph: a server-rendered SVG of its steps in layers below the entry,
//! each node with the step's kind, name and the users in it now, each edge labelled with
//! the path it stands for ("Yes", an Audience Paths group, a variant's name).
//!
//! The drawing is markup built by maud (names are escaped like any other text; no script,
//! no external asset, so the page's CSP needs nothing new). Its shapes are written with
//! closing tags (`<rect …></rect>`): in an HTML page an SVG element is not self-closing
//! unless written `<rect/>`, so a bare `<rect …>` would swallow the text after it. It is an image for people who
//! see it: the Canvas page's step list beside it is the textual equivalent, and the SVG says
//! so in its `<desc>`. A step sits one layer below the lowest step leading to it (the
//! longest distance from the entry, which the graph check's "no cycles" makes finite), so
//! every edge points down and none crosses back over a layer.

use maud::{Markup, html};
use tideway_core::canvas::CanvasDefinition;

use crate::canvases_api::StepFigures;

const NODE_W: i64 = 190;
const NODE_H: i64 = 62;
const GAP_X: i64 = 30;
const GAP_Y: i64 = 90;
const MARGIN: i64 = 20;
/// Longest name shown whole in a node; longer ones end in "…" (the node's `<title>` and the
/// step list have it whole).
const NAME_CHARS: usize = 24;

/// The layer of every step (0: a variant's first step), by the longest path from the entry.
/// Steps no variant reaches (the API refuses them; a stored definition has none) go in the
/// layer below the others, so nothing is left out of the drawing.
fn layers(def: &CanvasDefinition) -> Vec<usize> {
    let index = |id: &str| def.steps.iter().position(|s| s.id == id);
    let n = def.steps.len();
    let mut layer: Vec<Option<usize>> = vec![None; n];
    for v in &def.variants {
        if let Some(i) = index(&v.first_step) {
            layer[i] = Some(0);
        }
    }
    // Relax edges until nothing moves: at most `n` rounds in an acyclic graph (the bound
    // keeps a cycle, which the API refuses, from looping forever).
    for _ in 0..n {
        let mut moved = false;
        for (i, s) in def.steps.iter().enumerate() {
            let Some(from) = layer[i] else { continue };
            for (_, to) in s.kind.next_paths() {
                if let Some(j) = index(to)
                    && layer[j].is_none_or(|l| l < from + 1)
                {
                    layer[j] = Some(from + 1);
                    moved = true;
                }
            }
        }
        if !moved {
            break;
        }
    }
    let below = layer.iter().flatten().max().map_or(0, |m| m + 1);
    layer.into_iter().map(|l| l.unwrap_or(below)).collect()
}

/// `name` cut to [`NAME_CHARS`] characters.
fn short(name: &str) -> String {
    if name.chars().count() <= NAME_CHARS {
        name.to_owned()
    } else {
        let mut out: String = name.chars().take(NAME_CHARS - 1).collect();
        out.push('…');
        out
    }
}

struct Node {
    x: i64,
    y: i64,
}

/// An edge from the bottom of one node to the top of another, with its path's name.
struct Edge<'a> {
    from: (i64, i64),
    to: (i64, i64),
    label: Option<&'a str>,
}

impl<'a> Edge<'a> {
    /// The `k`th of `of` edges leaving `from`: they leave from points spread along its
    /// bottom, so edges of one step (and their labels) start apart.
    fn new(from: &Node, (k, of): (usize, usize), to: &Node, label: Option<&'a str>) -> Edge<'a> {
        let spread = NODE_W * (k as i64 + 1) / (of as i64 + 1);
        Edge {
            from: (from.x + spread, from.y + NODE_H),
            to: (to.x + NODE_W / 2, to.y),
            label,
        }
    }

    /// Where the label goes: a third of the way along, where edges of one step have
    /// parted but have not yet met other steps' edges.
    fn label_at(&self) -> (i64, i64) {
        let (x1, y1) = self.from;
        let (x2, y2) = self.to;
        let dy = (y2 - y1).min(GAP_Y);
        (x1 + (x2 - x1) / 3, y1 + dy / 3 + 4)
    }
}

/// The SVG of `def`'s steps with their figures (in step order, as `step_figures` gives them).
pub(super) fn svg(
    def: &CanvasDefinition,
    figures: &[StepFigures],
    step_href: impl Fn(&str) -> String,
) -> Markup {
    let layer = layers(def);
    let depth = layer.iter().max().map_or(0, |m| m + 1);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); depth];
    for (i, l) in layer.iter().enumerate() {
        rows[*l].push(i);
    }
    let widest = rows.iter().map(Vec::len).max().unwrap_or(1).max(1) as i64;
    let width = 2 * MARGIN + widest * NODE_W + (widest - 1) * GAP_X;
    // The entry node is the first row; the steps' layers follow.
    let row_y = |row: i64| MARGIN + row * (NODE_H + GAP_Y);
    let height = row_y(depth as i64 + 1) - GAP_Y + MARGIN;
    let mut nodes: Vec<Node> = (0..def.steps.len()).map(|_| Node { x: 0, y: 0 }).collect();
    for (l, row) in rows.iter().enumerate() {
        let span = row.len() as i64 * NODE_W + (row.len() as i64 - 1) * GAP_X;
        let left = (width - span) / 2;
        for (k, &i) in row.iter().enumerate() {
            nodes[i] = Node {
                x: left + k as i64 * (NODE_W + GAP_X),
                y: row_y(l as i64 + 1),
            };
        }
    }
    let entry = Node {
        x: (width - NODE_W) / 2,
        y: row_y(0),
    };
    let index = |id: &str| def.steps.iter().position(|s| s.id == id);
    // Edges: from the entry to each variant's first step (named when there are several), then
    // every step's paths.
    let mut edges: Vec<Edge<'_>> = Vec::new();
    let named = def.variants.len() > 1;
    let mut from_entry: Vec<(Option<&str>, usize)> = def
        .variants
        .iter()
        .filter_map(|v| Some((named.then_some(v.name.as_str()), index(&v.first_step)?)))
        .collect();
    // Edges leave a node in the order of where they go, left to right, so those of one
    // node do not cross each other.
    from_entry.sort_by_key(|&(_, j)| nodes[j].x);
    for (k, &(label, j)) in from_entry.iter().enumerate() {
        edges.push(Edge::new(&entry, (k, from_entry.len()), &nodes[j], label));
    }
    for (i, s) in def.steps.iter().enumerate() {
        let mut next: Vec<(Option<&str>, usize)> = s
            .kind
            .next_paths()
            .into_iter()
            .filter_map(|(path, to)| Some((path, index(to)?)))
            .collect();
        next.sort_by_key(|&(_, j)| nodes[j].x);
        for (k, &(path, j)) in next.iter().enumerate() {
            edges.push(Edge::new(&nodes[i], (k, next.len()), &nodes[j], path));
        }
    }
    let in_step = |i: usize| figures.get(i).map_or(0, |f| f.counts.in_step);
    let view_box = ["0 0 ", &width.to_string(), " ", &height.to_string()].concat();
    let summary = [
        "The Canvas's ",
        &def.steps.len().to_string(),
        " steps in layers below the entry, arrows labelled with the path they follow, each step with its kind, name and the users in it now. The step list below says the same in text.",
    ]
    .concat();
    html! {
        svg xmlns="http://www.w3.org/2000/svg" class="canvas-graph" id="canvas-graph" role="img"
            aria-labelledby="canvas-graph-title canvas-graph-desc"
            width=(width) height=(height) viewBox=(view_box) font-family="sans-serif" font-size="12" {
            title id="canvas-graph-title" { "The Canvas as a graph" }
            desc id="canvas-graph-desc" { (summary) }
            defs {
                marker id="canvas-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#5b6470" {}
                }
            }
            g class="edges" {
                @for e in &edges {
                    @let bend = (e.to.1 - e.from.1) / 2;
                    path class="edge" fill="none" stroke="#5b6470" stroke-width="1.5" marker-end="url(#canvas-arrow)"
                        d=(["M ", &e.from.0.to_string(), " ", &e.from.1.to_string(), " C ", &e.from.0.to_string(), " ", &(e.from.1 + bend).to_string(), " ", &e.to.0.to_string(), " ", &(e.to.1 - bend).to_string(), " ", &e.to.0.to_string(), " ", &e.to.1.to_string()].concat()) {}
                }
            }
            // Labels after every edge, so no edge is drawn over one; a halo of the page's
            // colour keeps them legible where edges cross.
            g class="edge-labels" text-anchor="middle" fill="#1f2933" stroke="#f6f8fa" stroke-width="4" paint-order="stroke" {
                @for e in &edges {
                    @if let Some(label) = e.label {
                        @let (x, y) = e.label_at();
                        text class="edge-label" x=(x) y=(y) { (short(label)) }
                    }
                }
            }
            g class="entry-node" {
                rect x=(entry.x) y=(entry.y) width=(NODE_W) height=(NODE_H) rx="31" fill="#e8f0fe" stroke="#3b6fd8" {}
                text x=(entry.x + NODE_W / 2) y=(entry.y + 26) text-anchor="middle" font-weight="bold" { "Entry" }
                text x=(entry.x + NODE_W / 2) y=(entry.y + 44) text-anchor="middle" fill="#5b6470" { (def.entry.schedule_type().replace('_', " ")) }
            }
            g class="nodes" {
                @for (i, s) in def.steps.iter().enumerate() {
                    @let n = &nodes[i];
                    a class="node" href=(step_href(&s.id)) {
                        title { (s.name) " (" (s.kind.type_name().replace('_', " ")) "): " (in_step(i)) " in step now" }
                        rect x=(n.x) y=(n.y) width=(NODE_W) height=(NODE_H) rx="6" fill="#ffffff" stroke="#5b6470" {}
                        text x=(n.x + 10) y=(n.y + 17) fill="#5b6470" font-size="11" { (s.kind.type_name().replace('_', " ")) }
                        text class="node-name" x=(n.x + 10) y=(n.y + 35) font-weight="bold" fill="#1f2933" { (short(&s.name)) }
                        text class="node-in-step" x=(n.x + 10) y=(n.y + 53) fill="#1f2933" { (in_step(i)) " in step now" }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(raw: serde_json::Value) -> CanvasDefinition {
        let mut n = 0;
        CanvasDefinition::parse(&raw, || {
            n += 1;
            format!("id-{n}")
        })
        .unwrap()
        .0
    }

    #[test]
    fn a_step_sits_below_the_lowest_step_leading_to_it() {
        // a → b → c, and a → c directly: c goes below b, so no edge points up.
        let d = def(json!({"entry": {"type": "api_triggered"}, "steps": [
            {"id": "a", "type": "decision_split", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}, "yes": "b", "no": "c"},
            {"id": "b", "type": "delay", "delay": {"seconds": 60}, "next": "c"},
            {"id": "c", "type": "delay", "delay": {"seconds": 60}},
        ]}));
        assert_eq!(layers(&d), [0, 1, 2]);
    }

    #[test]
    fn names_are_escaped_and_cut() {
        let d = def(json!({"entry": {"type": "api_triggered"}, "steps": [
            {"id": "a", "name": "<b>&</b>", "type": "delay", "delay": {"seconds": 60}},
        ]}));
        let out = svg(&d, &[], |id| ["#step-", id].concat()).into_string();
        assert!(out.contains("&lt;b&gt;&amp;&lt;/b&gt;"), "{out}");
        assert!(!out.contains("<b>"));
        // Every shape is closed, so the texts are not parsed as its (hidden) children.
        assert_eq!(
            out.matches("<rect ").count(),
            out.matches("</rect>").count()
        );
        assert_eq!(
            out.matches("<path ").count(),
            out.matches("</path>").count()
        );
        assert_eq!(
            short("abcdefghijklmnopqrstuvwxyz"),
            "abcdefghijklmnopqrstuvw…"
        );
    }
}
