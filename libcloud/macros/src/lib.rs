//! `#[libcloud::main]`: marks the app's entry function.
//!
//! ```ignore
//! #[libcloud::main]
//! fn main() -> Result<(), MyError> { ... }
//! ```
//!
//! `async fn main` runs on the kernel's executor (`libcloud::task`).
//!
//! It expands to the function itself plus the `__libcloud_main` symbol the
//! kernel calls after boot, which turns the return value into an exit status
//! through `libcloud::Termination`.

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, ItemFn};

#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[libcloud::main] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    if !func.sig.inputs.is_empty() || !func.sig.generics.params.is_empty() {
        return syn::Error::new_spanned(
            &func.sig,
            "#[libcloud::main] needs a `fn main()` or `async fn main()` without arguments (use libcloud::args())",
        )
        .to_compile_error()
        .into();
    }
    let name = &func.sig.ident;
    let call = if func.sig.asyncness.is_some() {
        quote! { ::libcloud::task::block_on(#name()) }
    } else {
        quote! { #name() }
    };
    quote! {
        #func

        #[doc(hidden)]
        #[no_mangle]
        pub fn __libcloud_main() -> i32 {
            ::libcloud::Termination::report(#call)
        }
    }
    .into()
}
