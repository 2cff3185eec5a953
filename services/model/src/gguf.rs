//! Reading a GGUF file: hyper-parameters, tokenizer, chat template, weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::{ModelError, Result};

/// A GGUF file opened and parsed, with the weights still on disk.
pub struct GgufFile {
    content: Content,
    file: std::fs::File,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        let content = Content::read(&mut file)
            .map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
        Ok(Self { content, file })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Load(format!("missing metadata key {key}")))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .to_f32()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key, Value::to_i32)
    }

    pub fn get_f32s(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key, Value::to_f32)
    }

    /// An array's values, each read by `read`.
    pub fn get_array<T>(
        &self,
        key: &str,
        read: impl Fn(&Value) -> candle_core::Result<T>,
    ) -> Result<Vec<T>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))?
            .iter()
            .map(read)
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .to_bool()
            .map_err(|e| ModelError::Load(format!("{key}: {e}")))
    }

    /// The Hugging Face repository the file was converted from, where its
    /// metadata names one (llama.cpp's converter writes
    /// `general.source.huggingface.repository`, or a `general.source.url`
    /// on huggingface.co): the base an adapter's PEFT config should name.
    pub fn hub_source(&self) -> Option<String> {
        if let Ok(repo) = self.get_str("general.source.huggingface.repository")
            && repo.split('/').count() == 2
        {
            return Some(repo.to_string());
        }
        let url = self.get_str("general.source.url").ok()?;
        let path = url.strip_prefix("https://huggingface.co/")?;
        let mut parts = path.split('/');
        match (parts.next(), parts.next()) {
            (Some(owner), Some(repo)) if !owner.is_empty() && !repo.is_empty() => {
                Some(format!("{owner}/{repo}"))
            }
            _ => None,
        }
    }

    /// Every tensor's name, in the order the file stores them.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name, info.offset))
            .collect();
        names.sort_by_key(|(_, offset)| *offset);
        names.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// A tensor's dimensions as stored (rows first), if the file has it.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims())
    }

    /// A tensor's type as stored, if the file has it.
    pub fn tensor_dtype(&self, name: &str) -> Option<candle_core::quantized::GgmlDType> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.ggml_dtype)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads one tensor as stored (quantized or not), on the CPU.
    pub fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| ModelError::Load(format!("tensor {name}: {e}")))
    }

    /// Rows `first..first + n` of a matrix as stored (quantized or not), on
    /// the CPU: one projection of a fused matrix. Rows are whole blocks, so
    /// the slice is the stored bytes themselves, and only those are read.
    pub fn rows(
        &mut self,
        name: &str,
        first: usize,
        n: usize,
    ) -> Result<candle_core::quantized::QTensor> {
        use std::io::{Read, Seek, SeekFrom};
        let bad = |e: String| ModelError::Load(format!("tensor {name}: {e}"));
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| bad("not in the file".into()))?;
        let (rows, cols) = info.shape.dims2().map_err(|e| bad(e.to_string()))?;
        if first + n > rows {
            return Err(bad(format!("has {rows} rows, not {}", first + n)));
        }
        let dtype = info.ggml_dtype;
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let at = self.content.tensor_data_offset + info.offset + (first * row_bytes) as u64;
        let mut bytes = vec![0u8; n * row_bytes];
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| bad(e.to_string()))?;
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![n, cols],
            &Device::Cpu,
        )?)
    }

    /// Loads one tensor and dequantizes it to f32.
    ///
    /// SmolLM2's weights are Q4_1; running them through candle's quantized
    /// matmul quantizes the *activations* to 8 bits as well, and at 135M
    /// parameters that is enough to turn "Paris" into nonsense. Dequantized
    /// weights with f32 activations answer correctly.
    pub fn tensor_f32(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.file, name, device)
            .map_err(|e| ModelError::Load(format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?)
    }
}

/// One tensor of a GGUF file being written: its name, dimensions (rows
/// first, as [`GgufFile::tensor_dims`] gives them) and type; its bytes come
/// when [`write`] reaches it.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: candle_core::quantized::GgmlDType,
}

impl TensorSpec {
    /// Bytes the tensor takes in the file.
    pub fn size(&self) -> usize {
        let elems: usize = self.dims.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// GGUF's alignment of tensor data.
const ALIGNMENT: u64 = 32;

/// Writes a GGUF file (version 3) one tensor at a time: `bytes(i)` gives
/// tensor `i`'s data when it is written, so a converter never holds more
/// than one tensor in memory. Returns the file's size.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut bytes: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    use std::io::Write;
    let failed = |e: std::io::Error| ModelError::Load(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(failed)?;
    let mut w = std::io::BufWriter::new(file);
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&value_type_id(value).to_le_bytes());
        put_value(&mut head, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &d in t.dims.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(t.dtype)?.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += padded(t.size() as u64);
    }
    head.resize(padded(head.len() as u64) as usize, 0);
    w.write_all(&head).map_err(failed)?;
    let mut written = head.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        let data = bytes(i)?;
        if data.len() != t.size() {
            return Err(ModelError::Load(format!(
                "tensor {} came as {} bytes where {:?} {:?} takes {}",
                t.name,
                data.len(),
                t.dtype,
                t.dims,
                t.size()
            )));
        }
        let pad = padded(data.len() as u64) as usize - data.len();
        w.write_all(&data).map_err(failed)?;
        w.write_all(&vec![0u8; pad]).map_err(failed)?;
        written += (data.len() + pad) as u64;
    }
    w.into_inner()
        .map_err(|e| failed(e.into_error()))?
        .sync_all()
        .map_err(failed)?;
    Ok(written)
}

/// GGUF's number for a metadata value's type.
fn value_type_id(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// GGML's number for the tensor types written here.
fn ggml_type_id(dtype: candle_core::quantized::GgmlDType) -> Result<u32> {
    use candle_core::quantized::GgmlDType as T;
    match dtype {
        T::F32 => Ok(0),
        T::F16 => Ok(1),
        T::Q4_0 => Ok(2),
        T::Q4_1 => Ok(3),
        T::Q8_0 => Ok(8),
        T::BF16 => Ok(30),
        other => Err(ModelError::Invalid(format!(
            "writing {other:?} tensors is not supported"
        ))),
    }
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(v) => put_string(out, v),
        Value::Array(items) => {
            let kind = items.first().map_or(4, value_type_id);
            if items.iter().any(|v| value_type_id(v) != kind) {
                return Err(ModelError::Invalid(
                    "a GGUF array holds values of one type".into(),
                ));
            }
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                put_value(out, v)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn what_is_written_reads_back_as_written() {
        let dir = std::env::temp_dir().join(format!("fw-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(3)),
            ("x.eps".to_string(), Value::F32(1e-5)),
            ("x.flag".to_string(), Value::Bool(true)),
            (
                "x.ids".to_string(),
                Value::Array(vec![Value::U32(7), Value::U32(9)]),
            ),
        ];
        // A tensor of 3 bytes' worth would break alignment: 3 f32s do.
        let tensors = vec![
            TensorSpec {
                name: "a".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
            TensorSpec {
                name: "b".into(),
                dims: vec![2, 3],
                dtype: GgmlDType::F16,
            },
        ];
        let a: Vec<f32> = vec![1.5, -2.0, 3.25];
        let b: Vec<half::f16> = [0.5f32, 1.0, -1.0, 2.0, 4.0, 8.0]
            .iter()
            .map(|&x| half::f16::from_f32(x))
            .collect();
        let size = write(&path, &metadata, &tensors, |i| {
            Ok(match i {
                0 => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => b.iter().flat_map(|x| x.to_le_bytes()).collect(),
            })
        })
        .unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 3);
        assert!(g.get_bool("x.flag").unwrap());
        assert_eq!(g.get_f32("x.eps").unwrap(), 1e-5);
        assert_eq!(g.get_array("x.ids", Value::to_u32).unwrap(), [7, 9]);
        assert_eq!(g.tensor_names(), ["a", "b"]);
        assert_eq!(g.tensor_dims("b"), Some(&[2usize, 3][..]));
        let read = |g: &mut GgufFile, n: &str| {
            g.tensor_f32(n, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(read(&mut g, "a"), a);
        assert_eq!(read(&mut g, "b"), [0.5, 1.0, -1.0, 2.0, 4.0, 8.0]);
        // Bytes of the wrong size are refused, naming the tensor.
        let e = write(&path, &metadata, &tensors, |_| Ok(vec![0; 4])).unwrap_err();
        assert!(e.to_string().contains("tensor a came as 4 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
