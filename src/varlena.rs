//! Reading varlena datums (text, bytea, jsonb) as bytes.

use pgrx::pg_sys;

/// The bytes of a varlena datum: detoasted (into the current memory context) when it is
/// compressed or out of line, read in place otherwise — the same test
/// `pg_detoast_datum_packed` makes, without the call into PostgreSQL, which pgrx guards with
/// a setjmp: noticeable when made for every field of every record, or every row of a scan.
///
/// # Safety
/// `datum` is a non-null varlena datum, valid for the returned lifetime.
pub unsafe fn bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: `datum` points to a varlena (caller's contract). An external or compressed one
    // is detoasted into a palloc'd copy (pg_detoast_datum_packed's own test); any other is read
    // in place, with its 1- or 4-byte header giving the length of the data that follows.
    unsafe {
        let v = datum.cast_mut_ptr::<pg_sys::varlena>();
        let v = if pgrx::varlena::varatt_is_1b_e(v) || pgrx::varlena::varatt_is_4b_c(v) {
            pg_sys::pg_detoast_datum_packed(v)
        } else {
            v
        };
        std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast::<u8>(), pgrx::varlena::varsize_any_exhdr(v))
    }
}
