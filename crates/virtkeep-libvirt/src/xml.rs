//! A small element tree over quick-xml events that remembers the byte span of every
//! tag and attribute, so the rewriter can splice the original text instead of
//! re-serialising it.

use std::ops::Range;

use quick_xml::XmlVersion;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::reader::Reader;

use crate::error::{XmlError, invalid, syntax};

/// One attribute of a start tag.
#[derive(Debug, Clone)]
pub(crate) struct Attr {
    pub name: String,
    /// Unescaped, normalised value.
    pub value: String,
    /// Byte span of the attribute name.
    pub name_span: Range<usize>,
    /// Byte span of the raw value, without the quotes.
    pub value_span: Range<usize>,
}

/// One element.
#[derive(Debug, Clone)]
pub(crate) struct Elem {
    pub name: String,
    /// Span of `<name …>` or `<name …/>`.
    pub start_tag: Range<usize>,
    /// Span of `</name>`; `None` for an empty-element tag.
    pub end_tag: Option<Range<usize>>,
    pub attrs: Vec<Attr>,
    pub children: Vec<usize>,
    /// Unescaped direct text content (text, references and CDATA of this element only).
    pub text: String,
}

impl Elem {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.as_str())
    }

    pub fn attr_full(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }

    /// Span of the whole element, start tag to end tag.
    pub fn span(&self) -> Range<usize> {
        let end = self.end_tag.as_ref().map_or(self.start_tag.end, |e| e.end);
        self.start_tag.start..end
    }

    pub fn is_empty_tag(&self) -> bool {
        self.end_tag.is_none()
    }
}

/// A parsed document: the elements in document order (index 0 is the root).
#[derive(Debug)]
pub(crate) struct Doc<'a> {
    pub src: &'a str,
    pub elems: Vec<Elem>,
}

impl<'a> Doc<'a> {
    pub fn parse(src: &'a str) -> Result<Doc<'a>, XmlError> {
        let mut reader = Reader::from_str(src);
        {
            let cfg = reader.config_mut();
            cfg.check_end_names = true;
            cfg.expand_empty_elements = false;
            cfg.trim_text(false);
        }
        let mut elems: Vec<Elem> = Vec::new();
        let mut stack: Vec<usize> = Vec::new();
        let mut root_closed = false;
        loop {
            let start = pos(reader.buffer_position());
            let ev = match reader.read_event() {
                Ok(ev) => ev,
                Err(e) => return Err(syntax(src, pos(reader.error_position()), e.to_string())),
            };
            let end = pos(reader.buffer_position());
            match ev {
                Event::Start(ref s) | Event::Empty(ref s) => {
                    let is_empty = matches!(ev, Event::Empty(_));
                    if stack.is_empty() && (root_closed || !elems.is_empty()) {
                        return Err(syntax(src, start, "more than one root element"));
                    }
                    let name = s.name().as_ref().to_owned();
                    let attrs = read_attrs(src, start..end, s)?;
                    let id = elems.len();
                    let parent = stack.last().copied();
                    elems.push(Elem {
                        name,
                        start_tag: start..end,
                        end_tag: None,
                        attrs,
                        children: Vec::new(),
                        text: String::new(),
                    });
                    if let Some(p) = parent {
                        elems[p].children.push(id);
                    }
                    if is_empty {
                        if stack.is_empty() {
                            root_closed = true;
                        }
                    } else {
                        stack.push(id);
                    }
                }
                Event::End(_) => {
                    let Some(id) = stack.pop() else {
                        return Err(syntax(src, start, "closing tag without an open element"));
                    };
                    elems[id].end_tag = Some(start..end);
                    if stack.is_empty() {
                        root_closed = true;
                    }
                }
                Event::Text(t) => {
                    let content = t.xml10_content();
                    match stack.last() {
                        Some(&id) => elems[id].text.push_str(&content),
                        None => {
                            if !content.trim().is_empty() {
                                return Err(syntax(src, start, "text outside the root element"));
                            }
                        }
                    }
                }
                Event::CData(c) => match stack.last() {
                    Some(&id) => elems[id].text.push_str(&c.xml10_content()),
                    None => return Err(syntax(src, start, "CDATA outside the root element")),
                },
                Event::GeneralRef(r) => {
                    let resolved: String = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        Ok(None) => match resolve_predefined_entity(&r) {
                            Some(s) => s.to_owned(),
                            None => {
                                return Err(syntax(
                                    src,
                                    start,
                                    format!("unknown entity reference &{};", &*r),
                                ));
                            }
                        },
                        Err(e) => return Err(syntax(src, start, e.to_string())),
                    };
                    match stack.last() {
                        Some(&id) => elems[id].text.push_str(&resolved),
                        None => {
                            return Err(syntax(src, start, "reference outside the root element"));
                        }
                    }
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Eof => {
                    if let Some(&open) = stack.last() {
                        let (l, c) = crate::error::line_col(src, elems[open].start_tag.start);
                        return Err(syntax(
                            src,
                            src.len(),
                            format!(
                                "unexpected end of document: <{}> opened at line {l}, column {c} is not closed",
                                elems[open].name
                            ),
                        ));
                    }
                    if elems.is_empty() {
                        return Err(syntax(src, src.len(), "document has no root element"));
                    }
                    break;
                }
            }
        }
        Ok(Doc { src, elems })
    }

    pub fn root(&self) -> &Elem {
        &self.elems[0]
    }

    pub fn elem(&self, id: usize) -> &Elem {
        &self.elems[id]
    }

    /// Children of `id` with the given qualified name.
    pub fn children_named<'s>(
        &'s self,
        id: usize,
        name: &'s str,
    ) -> impl Iterator<Item = usize> + 's {
        self.elems[id]
            .children
            .iter()
            .copied()
            .filter(move |&c| self.elems[c].name == name)
    }

    pub fn child(&self, id: usize, name: &str) -> Option<usize> {
        self.children_named(id, name).next()
    }

    /// Indentation (spaces/tabs) before the element when it starts its own line.
    pub fn indent_of(&self, id: usize) -> Option<&'a str> {
        let start = self.elems[id].start_tag.start;
        let line_start = self.src[..start].rfind('\n').map_or(0, |i| i + 1);
        let ws = &self.src[line_start..start];
        ws.bytes().all(|b| b == b' ' || b == b'\t').then_some(ws)
    }

    /// Span to delete to remove element `id` together with its own line's indentation
    /// and the preceding newline, so no blank line remains.
    pub fn removal_span(&self, id: usize) -> Range<usize> {
        let span = self.elems[id].span();
        let start = span.start;
        let line_start = self.src[..start].rfind('\n');
        match line_start {
            Some(nl)
                if self.src[nl + 1..start]
                    .bytes()
                    .all(|b| b == b' ' || b == b'\t') =>
            {
                nl..span.end
            }
            _ => span,
        }
    }
}

fn pos(p: u64) -> usize {
    usize::try_from(p).unwrap_or(usize::MAX)
}

/// Read the attributes of a start tag: values through quick-xml (validated,
/// unescaped), spans through a small scanner over the raw tag text.
fn read_attrs(
    src: &str,
    tag: Range<usize>,
    start: &quick_xml::events::BytesStart<'_>,
) -> Result<Vec<Attr>, XmlError> {
    let spans = scan_attr_spans(src, tag.clone());
    let mut out = Vec::new();
    for (i, a) in start.attributes().with_checks(true).enumerate() {
        let a = a.map_err(|e| syntax(src, tag.start, format!("bad attribute: {e}")))?;
        let name = a.key.as_ref().to_owned();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| invalid(src, tag.start, format!("attribute {name}"), e.to_string()))?
            .into_owned();
        let Some((name_span, value_span)) = spans.get(i).cloned() else {
            return Err(syntax(src, tag.start, "cannot locate attribute in tag"));
        };
        if src.get(name_span.clone()) != Some(name.as_str()) {
            return Err(syntax(src, tag.start, "cannot locate attribute in tag"));
        }
        out.push(Attr {
            name,
            value,
            name_span,
            value_span,
        });
    }
    Ok(out)
}

/// Byte spans (name, value-inside-quotes) of every attribute in the tag at `tag`.
fn scan_attr_spans(src: &str, tag: Range<usize>) -> Vec<(Range<usize>, Range<usize>)> {
    let b = src.as_bytes();
    let end = tag.end.min(b.len());
    let mut i = tag.start + 1; // past '<'
    let is_ws = |c: u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n');
    while i < end && !is_ws(b[i]) && b[i] != b'/' && b[i] != b'>' {
        i += 1;
    }
    let mut out = Vec::new();
    loop {
        while i < end && is_ws(b[i]) {
            i += 1;
        }
        if i >= end || b[i] == b'/' || b[i] == b'>' {
            break;
        }
        let ns = i;
        while i < end && !is_ws(b[i]) && b[i] != b'=' {
            i += 1;
        }
        let name = ns..i;
        while i < end && is_ws(b[i]) {
            i += 1;
        }
        if i >= end || b[i] != b'=' {
            break;
        }
        i += 1;
        while i < end && is_ws(b[i]) {
            i += 1;
        }
        if i >= end || (b[i] != b'\'' && b[i] != b'"') {
            break;
        }
        let q = b[i];
        i += 1;
        let vs = i;
        while i < end && b[i] != q {
            i += 1;
        }
        out.push((name, vs..i));
        i += 1;
    }
    out
}

/// Escape text content. `\r` becomes a character reference so it survives
/// end-of-line normalisation. Characters XML 1.0 cannot carry are refused.
pub(crate) fn escape_text(s: &str) -> Result<String, XmlError> {
    escape(s, false)
}

/// Escape an attribute value (for either quote style); tabs and newlines become
/// character references so attribute-value normalisation keeps them.
pub(crate) fn escape_attr(s: &str) -> Result<String, XmlError> {
    escape(s, true)
}

fn escape(s: &str, attr: bool) -> Result<String, XmlError> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '"' if attr => out.push_str("&quot;"),
            '\'' if attr => out.push_str("&apos;"),
            '\n' if attr => out.push_str("&#10;"),
            '\t' if attr => out.push_str("&#9;"),
            '\t' | '\n' => out.push(c),
            c if is_xml_char(c) => out.push(c),
            c => {
                return Err(XmlError::Rewrite(format!(
                    "character U+{:04X} cannot be represented in XML 1.0",
                    u32::from(c)
                )));
            }
        }
    }
    Ok(out)
}

fn is_xml_char(c: char) -> bool {
    matches!(u32::from(c), 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_values() {
        let src = "<a x='1&amp;2' y = \"q'\"><b z='&#10;'/>t&lt;u<![CDATA[<v>]]></a>";
        let doc = Doc::parse(src).expect("parse");
        let a = doc.root();
        assert_eq!(a.attr("x"), Some("1&2"));
        assert_eq!(a.attr("y"), Some("q'"));
        assert_eq!(&src[a.attrs[1].value_span.clone()], "q'");
        assert_eq!(&src[a.attrs[0].name_span.clone()], "x");
        assert_eq!(a.text, "t<u<v>");
        let b = doc.elem(1);
        assert_eq!(b.attr("z"), Some("\n"));
        assert!(b.is_empty_tag());
    }

    #[test]
    fn errors_have_positions() {
        let err = Doc::parse("<a>\n  <b></c>\n</a>").expect_err("mismatch");
        match err {
            XmlError::Syntax { line, column, .. } => assert_eq!((line, column), (2, 6)),
            other => panic!("unexpected {other:?}"),
        }
        let err = Doc::parse("<a>\n  <b>").expect_err("eof");
        assert!(
            err.to_string().contains("<b> opened at line 2, column 3"),
            "{err}"
        );
        assert!(Doc::parse("<a x='1' x='2'/>").is_err());
        assert!(Doc::parse("<a>&nope;</a>").is_err());
        assert!(Doc::parse("").is_err());
        assert!(Doc::parse("<a/><b/>").is_err());
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape_attr("a<&'\"\n\tb").expect("ok"),
            "a&lt;&amp;&apos;&quot;&#10;&#9;b"
        );
        assert_eq!(escape_text("x\ry'\"").expect("ok"), "x&#13;y'\"");
        assert!(escape_text("\u{1}").is_err());
    }
}
