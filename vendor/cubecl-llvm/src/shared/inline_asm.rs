//! A kernel's own inline assembly (`gpu_asm!`). Its templates are PTX, so only NVPTX lowers it.

use crate::{prelude::*, shared::to_llvm::nvptx_only};
use cubecl_core::ir::dialect::InlineAsmOp;

nvptx_only!(InlineAsmOp, inline_asm::lower_cube_asm);
