//! RESULT bodies: just enough of ROWS and PREPARED to rewrite system tables.

use bytes::Bytes;

use super::types::{BodyError, BodyResult, Reader};
use super::version::ProtocolVersion;

pub mod kind {
    pub const VOID: i32 = 1;
    pub const ROWS: i32 = 2;
    pub const SET_KEYSPACE: i32 = 3;
    pub const PREPARED: i32 = 4;
    pub const SCHEMA_CHANGE: i32 = 5;
}

pub mod metadata_flags {
    pub const GLOBAL_TABLES_SPEC: i32 = 0x0001;
    pub const HAS_MORE_PAGES: i32 = 0x0002;
    pub const NO_METADATA: i32 = 0x0004;
}

/// The type id of `inet` columns.
pub const TYPE_INET: u16 = 0x0010;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    pub type_id: u16,
}

/// A parsed ROWS body. Slices point into the original body so unchanged parts are reused.
#[derive(Debug, Clone)]
pub struct Rows<'a> {
    pub flags: i32,
    pub columns_count: i32,
    pub paging_state: Option<&'a [u8]>,
    /// Column specs exactly as sent (global spec included), for re-emitting.
    pub raw_specs: &'a [u8],
    /// `None` when the server sent NO_METADATA (the client asked to skip it).
    pub columns: Option<Vec<ColumnSpec>>,
    pub rows_count: i32,
    pub rows: &'a [u8],
}

pub fn result_kind(body: &[u8]) -> BodyResult<i32> {
    Reader::new(body).i32()
}

fn skip_type(r: &mut Reader<'_>, depth: usize) -> BodyResult<u16> {
    if depth > 32 {
        return Err(BodyError::Invalid("type nesting too deep"));
    }
    let id = r.u16()?;
    match id {
        0x0000 => {
            r.string()?;
        }
        0x0020 | 0x0022 => {
            skip_type(r, depth + 1)?;
        }
        0x0021 => {
            skip_type(r, depth + 1)?;
            skip_type(r, depth + 1)?;
        }
        0x0030 => {
            r.string()?;
            r.string()?;
            let n = r.u16()?;
            for _ in 0..n {
                r.string()?;
                skip_type(r, depth + 1)?;
            }
        }
        0x0031 => {
            let n = r.u16()?;
            for _ in 0..n {
                skip_type(r, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(id)
}

fn column_specs(r: &mut Reader<'_>, flags: i32, count: i32) -> BodyResult<Vec<ColumnSpec>> {
    if count < 0 {
        return Err(BodyError::Invalid("negative column count"));
    }
    let global = flags & metadata_flags::GLOBAL_TABLES_SPEC != 0;
    if global {
        r.string()?;
        r.string()?;
    }
    let mut cols = Vec::with_capacity((count as usize).min(1024));
    for _ in 0..count {
        if !global {
            r.string()?;
            r.string()?;
        }
        let name = r.string()?.to_owned();
        let type_id = skip_type(r, 0)?;
        cols.push(ColumnSpec { name, type_id });
    }
    Ok(cols)
}

/// Reads `<flags><columns_count>[<paging_state>][<specs>]`, the rows metadata of spec §4.2.5.2,
/// into a `Rows` that has no rows yet.
fn rows_metadata<'a>(r: &mut Reader<'a>) -> BodyResult<Rows<'a>> {
    let flags = r.i32()?;
    let columns_count = r.i32()?;
    let paging_state = if flags & metadata_flags::HAS_MORE_PAGES != 0 {
        r.bytes()?
    } else {
        None
    };
    let before = r.remaining();
    let columns = if flags & metadata_flags::NO_METADATA != 0 {
        None
    } else {
        Some(column_specs(r, flags, columns_count)?)
    };
    let raw_specs = &before[..before.len() - r.remaining().len()];
    Ok(Rows {
        flags,
        columns_count,
        paging_state,
        raw_specs,
        columns,
        rows_count: 0,
        rows: &[],
    })
}

impl<'a> Rows<'a> {
    /// Parses a RESULT body of kind ROWS (the kind [int] included).
    pub fn parse(body: &'a [u8]) -> BodyResult<Rows<'a>> {
        let mut r = Reader::new(body);
        if r.i32()? != kind::ROWS {
            return Err(BodyError::Invalid("not a ROWS result"));
        }
        let mut rows = rows_metadata(&mut r)?;
        rows.rows_count = r.i32()?;
        if rows.rows_count < 0 {
            return Err(BodyError::Invalid("negative row count"));
        }
        rows.rows = r.remaining();
        Ok(rows)
    }

    /// Iterates over rows as vectors of cell values (`None` = null).
    ///
    /// Both counts come from the peer: allocations are bounded by the bytes actually present
    /// (every cell takes at least four), and rows without columns carry no data to return.
    pub fn cells(&self) -> BodyResult<Vec<Vec<Option<&'a [u8]>>>> {
        let mut r = Reader::new(self.rows);
        let columns = self.columns_count.max(0) as usize;
        if columns == 0 {
            return Ok(Vec::new());
        }
        let max_cells = self.rows.len() / 4;
        if columns > max_cells || (self.rows_count as usize).saturating_mul(columns) > max_cells {
            return Err(BodyError::Truncated("rows"));
        }
        let mut out = Vec::with_capacity(self.rows_count as usize);
        for _ in 0..self.rows_count {
            let mut row = Vec::with_capacity(columns);
            for _ in 0..self.columns_count {
                row.push(r.bytes()?);
            }
            out.push(row);
        }
        Ok(out)
    }
}

/// What the proxy keeps of a PREPARED result: the id, and the result columns so an EXECUTE with
/// skip_metadata can still be rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub id: Bytes,
    pub result_columns: Option<Vec<ColumnSpec>>,
}

impl Prepared {
    pub fn parse(body: &[u8], version: ProtocolVersion) -> BodyResult<Prepared> {
        let mut r = Reader::new(body);
        if r.i32()? != kind::PREPARED {
            return Err(BodyError::Invalid("not a PREPARED result"));
        }
        let id = Bytes::copy_from_slice(r.short_bytes()?);
        // Prepared (bind variable) metadata.
        let flags = r.i32()?;
        let count = r.i32()?;
        if version.has_prepared_key_indexes() {
            let pk_count = r.i32()?;
            for _ in 0..pk_count.max(0) {
                r.u16()?;
            }
        }
        column_specs(&mut r, flags, count)?;
        let result_columns = rows_metadata(&mut r)?.columns;
        Ok(Prepared { id, result_columns })
    }
}

#[cfg(test)]
pub(crate) mod test_bodies {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::frame::types::WriteExt;

    /// A v4 PREPARED body for `id`: no bind variables, one result column,
    /// `system.local.rpc_address`.
    pub(crate) fn prepared_rpc_address_body(id: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i32(kind::PREPARED);
        b.put_short_bytes(id);
        // Bind variables: flags, count, partition key count.
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(metadata_flags::GLOBAL_TABLES_SPEC);
        b.put_i32(1);
        b.put_string("system");
        b.put_string("local");
        b.put_string("rpc_address");
        b.put_u16(TYPE_INET);
        b.freeze()
    }

    /// A ROWS body: global spec `ks.table`, the given (name, type) columns and rows.
    pub(crate) fn rows_body(
        table: &str,
        columns: &[(&str, u16)],
        rows: &[Vec<Option<&[u8]>>],
        paging: Option<&[u8]>,
    ) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i32(kind::ROWS);
        let mut flags = metadata_flags::GLOBAL_TABLES_SPEC;
        if paging.is_some() {
            flags |= metadata_flags::HAS_MORE_PAGES;
        }
        b.put_i32(flags);
        b.put_i32(columns.len() as i32);
        if let Some(p) = paging {
            b.put_bytes_value(Some(p));
        }
        b.put_string("system");
        b.put_string(table);
        for (name, ty) in columns {
            b.put_string(name);
            b.put_u16(*ty);
            if *ty == 0x0022 {
                b.put_u16(0x000d);
            }
        }
        b.put_i32(rows.len() as i32);
        for row in rows {
            for cell in row {
                b.put_bytes_value(*cell);
            }
        }
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::test_bodies::rows_body;
    use super::*;
    use crate::frame::types::WriteExt;

    #[test]
    fn parses_rows_with_collections() {
        let body = rows_body(
            "local",
            &[
                ("key", 0x000d),
                ("tokens", 0x0022),
                ("rpc_address", TYPE_INET),
            ],
            &[vec![Some(b"local"), None, Some(&[127, 0, 0, 1])]],
            Some(b"pg"),
        );
        let rows = Rows::parse(&body).unwrap();
        assert_eq!(rows.paging_state, Some(&b"pg"[..]));
        let cols = rows.columns.as_ref().unwrap();
        assert_eq!(cols[1].name, "tokens");
        assert_eq!(cols[2].type_id, TYPE_INET);
        let cells = rows.cells().unwrap();
        assert_eq!(cells[0][2], Some(&[127u8, 0, 0, 1][..]));
    }

    #[test]
    fn parses_prepared_v4() {
        let mut b = BytesMut::new();
        b.put_i32(kind::PREPARED);
        b.put_short_bytes(&[1, 2, 3]);
        b.put_i32(metadata_flags::GLOBAL_TABLES_SPEC);
        b.put_i32(1);
        b.put_i32(1);
        b.put_u16(0);
        b.put_string("system");
        b.put_string("local");
        b.put_string("key");
        b.put_u16(0x000d);
        b.put_i32(metadata_flags::GLOBAL_TABLES_SPEC);
        b.put_i32(1);
        b.put_string("system");
        b.put_string("local");
        b.put_string("rpc_address");
        b.put_u16(TYPE_INET);
        let p = Prepared::parse(&b, ProtocolVersion::V4).unwrap();
        assert_eq!(&p.id[..], &[1, 2, 3]);
        assert_eq!(p.result_columns.unwrap()[0].name, "rpc_address");
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // Found by the frame_decoder fuzz target: a huge column count made `cells` reserve
        // gigabytes, and a huge row count with no columns looped for billions of rows.
        let mut b = BytesMut::new();
        b.put_i32(kind::ROWS);
        b.put_i32(metadata_flags::NO_METADATA);
        b.put_i32(0x7fff_ffff);
        b.put_i32(1);
        b.put_slice(&[0; 16]);
        assert!(Rows::parse(&b).unwrap().cells().is_err());
        let mut b = BytesMut::new();
        b.put_i32(kind::ROWS);
        b.put_i32(metadata_flags::NO_METADATA);
        b.put_i32(0);
        b.put_i32(0x7fff_ffff);
        assert!(Rows::parse(&b).unwrap().cells().unwrap().is_empty());
        // The artifact itself.
        let artifact = hex::decode("8e280f000000000027000000000000029696969696969600000000000027000000000000000000000000000000009e0000000000000000000000000000000000000000000000006600000000000000000a0196").unwrap();
        let _ = Rows::parse(&artifact[9..]).map(|r| r.cells());
    }

    #[test]
    fn truncated_rows_are_errors() {
        let body = rows_body(
            "peers",
            &[("peer", TYPE_INET)],
            &[vec![Some(&[1, 2, 3, 4])]],
            None,
        );
        for cut in 0..body.len() - 1 {
            let r = Rows::parse(&body[..cut]).and_then(|r| r.cells().map(|_| ()));
            assert!(r.is_err(), "cut at {cut}");
        }
    }
}
