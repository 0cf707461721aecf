//! Error types of this crate.

/// An error reading or rewriting domain XML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// The text is not well-formed XML.
    #[error("malformed XML at line {line}, column {column} (byte {offset}): {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column, counted in characters.
        column: usize,
        /// Byte offset into the input.
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// Well-formed XML whose root element is not `<domain>`.
    #[error("not a libvirt domain: the root element is <{found}>, expected <domain>")]
    NotADomain {
        /// Name of the root element found (empty when the document has none).
        found: String,
    },
    /// A required element is missing.
    #[error("domain XML has no {what}")]
    Missing {
        /// What is missing, e.g. `<name>`.
        what: &'static str,
    },
    /// An element or attribute has a value this crate cannot accept.
    #[error("invalid {what} at line {line}, column {column}: {message}")]
    Invalid {
        /// What was being read, e.g. `<disk> device`.
        what: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The requested [`crate::Rewrite`] cannot be applied to this document.
    #[error("cannot rewrite domain XML: {0}")]
    Rewrite(String),
}

/// An error parsing the output of a hypervisor command.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The output was not the JSON document expected.
    #[error("{what}: output is not the expected JSON: {source}")]
    Json {
        /// The command whose output this was.
        what: &'static str,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The output does not have the expected shape.
    #[error("{what}: unexpected output: {detail}")]
    Unexpected {
        /// The command whose output this was.
        what: &'static str,
        /// What was found.
        detail: String,
    },
    /// XML output (e.g. capabilities) that could not be read.
    #[error("{what}: {source}")]
    Xml {
        /// The command whose output this was.
        what: &'static str,
        /// The XML error.
        #[source]
        source: XmlError,
    },
}

/// 1-based line and column (in characters) of a byte offset in `src`.
pub(crate) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(src.len());
    while off > 0 && !src.is_char_boundary(off) {
        off -= 1;
    }
    let before = &src[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

pub(crate) fn syntax(src: &str, offset: usize, message: impl Into<String>) -> XmlError {
    let (line, column) = line_col(src, offset);
    XmlError::Syntax {
        line,
        column,
        offset,
        message: message.into(),
    }
}

pub(crate) fn invalid(
    src: &str,
    offset: usize,
    what: impl Into<String>,
    message: impl Into<String>,
) -> XmlError {
    let (line, column) = line_col(src, offset);
    XmlError::Invalid {
        what: what.into(),
        line,
        column,
        message: message.into(),
    }
}
