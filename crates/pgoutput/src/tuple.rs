//! Tuple data: the column values of an Insert, Update or Delete.
//!
//! A [`TupleData`] is a validated, zero-copy slice of the message. Validation happens once at
//! decode time, so iterating the columns afterwards cannot fail and allocates nothing.

use bytes::Bytes;

use crate::error::{DecodeError, ErrorKind};
use crate::reader::Reader;

/// One column value as sent by pgoutput.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column<'a> {
    /// SQL NULL (`'n'`).
    Null,
    /// An unchanged TOASTed value that was not sent (`'u'`); only in Update new tuples.
    UnchangedToast,
    /// The value in the type's text output format (`'t'`).
    Text(&'a [u8]),
    /// The value in the type's binary send format (`'b'`, with `binary 'true'`).
    Binary(&'a [u8]),
}

impl<'a> Column<'a> {
    /// The value's bytes, whichever format, or `None` for NULL and unchanged TOAST.
    ///
    /// ```
    /// use pgoutput::Column;
    /// assert_eq!(Column::Text(b"42").bytes(), Some(&b"42"[..]));
    /// assert_eq!(Column::Binary(&[0, 0, 0, 42]).bytes(), Some(&[0, 0, 0, 42][..]));
    /// assert_eq!(Column::Null.bytes(), None);
    /// assert_eq!(Column::UnchangedToast.bytes(), None);
    /// ```
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Column::Text(b) | Column::Binary(b) => Some(b),
            Column::Null | Column::UnchangedToast => None,
        }
    }
}

/// The columns of one row, borrowed from the message bytes.
///
/// Two tuples are equal when their encoded bytes are. Iterating yields [`Column`]s that borrow
/// from the message, in the column order of the relation's [`Relation`](crate::Relation).
///
/// ```
/// use bytes::Bytes;
/// use pgoutput::{Column, Decoder, Message, OldTuple};
///
/// // Update of relation 1 with REPLICA IDENTITY DEFAULT and a key change: old key 'K' (id 1,
/// // other column NULL), new row (id 2, unchanged TOASTed column).
/// let raw = Bytes::from_static(b"U\0\0\0\x01K\0\x02t\0\0\0\x011nN\0\x02t\0\0\0\x012u");
/// let Message::Update(u) = Decoder::new(1).decode(raw).unwrap() else { panic!() };
/// let Some(OldTuple::Key(key)) = &u.old else { panic!() };
/// assert_eq!(key.iter().collect::<Vec<_>>(), [Column::Text(b"1"), Column::Null]);
/// let mut new = u.new.iter();
/// assert_eq!(new.len(), 2);
/// assert_eq!(new.next(), Some(Column::Text(b"2")));
/// assert_eq!(new.next(), Some(Column::UnchangedToast));
/// assert_eq!(new.next(), None);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TupleData {
    raw: Bytes,
    len: u16,
}

impl std::fmt::Debug for TupleData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl TupleData {
    /// Reads and validates a TupleData at the reader's position.
    pub(crate) fn decode(r: &mut Reader<'_>, owner: &Bytes) -> Result<Self, DecodeError> {
        let len = r.u16("tuple.ncolumns")?;
        let start = r.pos();
        for _ in 0..len {
            match r.u8("tuple.column_kind")? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let n = r.i32("tuple.column_length")?;
                    let n = usize::try_from(n).map_err(|_| {
                        r.err("tuple.column_length", ErrorKind::InvalidLength(n.into()))
                    })?;
                    r.take(n, "tuple.column_value")?;
                }
                other => return Err(r.err("tuple.column_kind", ErrorKind::UnexpectedTag(other))),
            }
        }
        Ok(TupleData {
            raw: owner.slice(start..r.pos()),
            len,
        })
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The columns in table order (the order of the Relation message's columns).
    pub fn iter(&self) -> Columns<'_> {
        Columns {
            buf: &self.raw,
            left: self.len,
        }
    }

    /// The encoded column bytes (without the column count), as a zero-copy slice.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// A tuple of `len` columns whose bytes the encoder laid out as pgoutput does (see
    /// `TupleData::encode` in `crate::encode`); decoding never builds tuples this way.
    #[cfg(any(test, feature = "encode"))]
    pub(crate) fn from_encoded(raw: Bytes, len: u16) -> TupleData {
        TupleData { raw, len }
    }
}

impl<'a> IntoIterator for &'a TupleData {
    type Item = Column<'a>;
    type IntoIter = Columns<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over a [`TupleData`]'s columns.
#[derive(Debug, Clone)]
pub struct Columns<'a> {
    buf: &'a [u8],
    left: u16,
}

impl<'a> Iterator for Columns<'a> {
    type Item = Column<'a>;

    fn next(&mut self) -> Option<Column<'a>> {
        // The bytes were validated by `TupleData::decode`; the `get`s below only keep this code
        // free of panics should that ever change.
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (&kind, rest) = self.buf.split_first()?;
        match kind {
            b'n' => {
                self.buf = rest;
                Some(Column::Null)
            }
            b'u' => {
                self.buf = rest;
                Some(Column::UnchangedToast)
            }
            _ => {
                let len_bytes: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                let n = usize::try_from(i32::from_be_bytes(len_bytes)).ok()?;
                let value = rest.get(4..4 + n)?;
                self.buf = rest.get(4 + n..)?;
                Some(if kind == b't' {
                    Column::Text(value)
                } else {
                    Column::Binary(value)
                })
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl ExactSizeIterator for Columns<'_> {}
