//! Decode errors: which message, which field, and what was wrong with it.
//!
//! Errors are small `Copy` values (no allocation, no formatting) because the decoder runs on the
//! hot path; the text is produced only when an error is displayed.

use std::fmt;

/// What was wrong with the bytes of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The message ended before the field did.
    UnexpectedEnd {
        /// Bytes the field needed.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The message's first byte is not a pgoutput message type.
    UnknownMessageType(u8),
    /// A one-byte marker (tuple kind, column kind) had an unexpected value.
    UnexpectedTag(u8),
    /// A NUL-terminated string had no terminator.
    UnterminatedString,
    /// A string was not valid UTF-8.
    InvalidUtf8,
    /// A length was negative or larger than the message.
    InvalidLength(i64),
    /// Bytes were left over after the last field.
    TrailingBytes(usize),
    /// The message is not valid where it appeared (for example Stream Stop outside a stream).
    UnexpectedMessage,
}

/// A pgoutput message could not be decoded.
///
/// ```
/// use bytes::Bytes;
/// use pgoutput::Decoder;
/// let err = Decoder::new(1).decode(Bytes::from_static(b"B\0\0")).unwrap_err();
/// assert_eq!(err.message_type(), b'B');
/// assert_eq!(err.field(), "final_lsn");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    message_type: u8,
    field: &'static str,
    kind: ErrorKind,
}

impl DecodeError {
    pub(crate) fn new(message_type: u8, field: &'static str, kind: ErrorKind) -> Self {
        Self {
            message_type,
            field,
            kind,
        }
    }

    /// The message type byte (`b'I'` for Insert, …), or 0 for an empty message.
    pub fn message_type(&self) -> u8 {
        self.message_type
    }

    /// The field being decoded when the error was found.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What was wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// Human name of a pgoutput message type byte, for error messages.
///
/// ```
/// assert_eq!(pgoutput::message_type_name(b'K'), "Commit Prepared");
/// assert_eq!(pgoutput::message_type_name(b'?'), "unknown");
/// ```
pub fn message_type_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => "unknown",
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = message_type_name(self.message_type);
        let tag = self.message_type.escape_ascii();
        write!(
            f,
            "malformed pgoutput {name} message ('{tag}'), field {}: ",
            self.field
        )?;
        match self.kind {
            ErrorKind::UnexpectedEnd { needed, available } => {
                write!(f, "needs {needed} bytes but only {available} remain")
            }
            ErrorKind::UnknownMessageType(t) => {
                write!(f, "unknown message type byte 0x{t:02x}")
            }
            ErrorKind::UnexpectedTag(t) => write!(f, "unexpected marker byte 0x{t:02x}"),
            ErrorKind::UnterminatedString => write!(f, "string has no NUL terminator"),
            ErrorKind::InvalidUtf8 => write!(f, "string is not valid UTF-8"),
            ErrorKind::InvalidLength(n) => write!(f, "invalid length {n}"),
            ErrorKind::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the message"),
            ErrorKind::UnexpectedMessage => write!(f, "message not valid in this position"),
        }
    }
}

impl std::error::Error for DecodeError {}
