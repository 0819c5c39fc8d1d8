//! One ONNX node as the importer reads it: its name (or a made-up one), op type, and typed attribute access that
//! refuses attributes the importer does not know, so that nothing is silently ignored.

use super::proto::{AttributeProto, NodeProto};

pub(crate) struct NodeRef<'a> {
    pub p: &'a NodeProto,
    pub name: String,
    pub op: &'a str,
}

impl<'a> NodeRef<'a> {
    pub fn new(p: &'a NodeProto, index: usize) -> Self {
        let op = p.op_type.as_deref().unwrap_or("");
        let name = match p.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{op}_{index}"),
        };
        NodeRef { p, name, op }
    }

    fn attr(&self, name: &str) -> Option<&'a AttributeProto> {
        self.p
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    /// An error for any attribute not in `known`.
    pub fn check_attrs(&self, known: &[&str]) -> Result<(), String> {
        for a in &self.p.attribute {
            let n = a.name.as_deref().unwrap_or("");
            if !known.contains(&n) {
                return Err(format!("unsupported attribute {n:?}"));
            }
        }
        Ok(())
    }

    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }

    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }

    pub fn string(&self, name: &str) -> Option<String> {
        self.attr(name)
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }

    pub fn attribute(&self, name: &str) -> Option<&'a AttributeProto> {
        self.attr(name)
    }

    /// The name of input `i`, `None` when absent or empty (an omitted optional input).
    pub fn input(&self, i: usize) -> Option<&'a str> {
        self.p
            .input
            .get(i)
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }
}
