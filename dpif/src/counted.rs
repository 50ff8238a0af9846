//! `counted_enum!`: a `#[repr(u8)]` enum of reasons with a stable name per
//! variant, a dense index for counter arrays, and the list of all values.
//! Used for drop reasons and punt reasons.

/// Define a counted enum: `counted_enum! { pub enum Name { Variant =>
/// "name", ... } }`.
#[macro_export]
macro_rules! counted_enum {
    ($(#[$meta:meta])* $vis:vis enum $ty:ident { $($(#[$vmeta:meta])* $name:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        $vis enum $ty { $($(#[$vmeta])* $name,)* }

        impl $ty {
            /// Every value, in counter order.
            pub const ALL: &'static [$ty] = &[$($ty::$name,)*];
            /// Number of values (length of a counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name, for metrics and `ctl stats`.
            pub const fn name(self) -> &'static str {
                match self { $($ty::$name => $text,)* }
            }

            /// Index into a counter array (`< COUNT`).
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}
