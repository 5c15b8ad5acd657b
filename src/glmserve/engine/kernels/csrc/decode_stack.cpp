// All decoder layers of a CPU decode step in one call: the same kernels the Python layers call
// (quant_linear.cpp, decode_ops.cpp, oneDNN's prepacked bf16 linear), in the same order with the
// same roundings, without ~15 Python-level calls per layer. On a small model those calls cost
// about as much as the layer's arithmetic (SmolLM2-135M: ~70 us of ~180 us per layer, one row).
//
// A layer (Llama, ChatGLM2/3 / GLM-4, Baichuan alike; layers/decode_stack.py builds it):
//   h = rms_norm(x);  qkv = qkv_proj(h)                  qkv [T, (H + 2 KVH) * D]: q, k, v heads
//   rotary_ on the q and k heads (if the model has rotary embeddings); write k, v to the cache
//   a = decode_attention(q, caches, ...);  x, h = add_rms_norm(x, o_proj(a))
//   x = x + down(silu_mul(gate_up(h)))
// Each linear runs as layers/linear.py's Linear.forward would: its native int4 / int8 kernel for up
// to `max_rows` rows (any rows when it keeps no dense copy), else the dense weight (prepacked for
// oneDNN or plain), bias added as there.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace glmserve {

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& mins, int64_t group_size, int64_t isa);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t group_size,
                       int64_t isa);

namespace decode_ops {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w,
                                                double eps);
at::Tensor silu_mul(const at::Tensor& x);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved);
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes);
void lora_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const at::Tensor& row_slots,
               int64_t width);
}  // namespace decode_ops

namespace {

enum LinearKind : int64_t { kDense = 0, kInt4 = 1, kInt8 = 2 };

at::Tensor prepacked_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x, w, bias, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

struct LinearWeight {
  int64_t kind = kDense;
  at::Tensor quant, scales;          // native form (kind != kDense): nibbles / int8 values, group scales
  c10::optional<at::Tensor> mins;    // int4 group mins (None: Q4_0's -8 * scale)
  int64_t group_size = 0;
  int64_t max_rows = 0;              // rows up to which the native kernel beats the dense copy
  c10::optional<at::Tensor> dense;   // [N, K] plain, or oneDNN's layout when `prepacked`
  bool prepacked = false;
  c10::optional<at::Tensor> bias;
  c10::optional<at::Tensor> lora_a, lora_bt;  // resident LoRA adapters (layers/lora.py), W rows per slot
  int64_t lora_width = 0;

  at::Tensor operator()(const at::Tensor& x, const c10::optional<at::Tensor>& row_slots) const {
    at::Tensor out = base(x);
    if (row_slots.has_value() && lora_a.has_value()) decode_ops::lora_add_(out, x, *lora_a, *lora_bt, *row_slots, lora_width);
    return out;
  }

  at::Tensor base(const at::Tensor& x) const {
    if (kind != kDense && (!dense.has_value() || x.size(0) <= max_rows)) {
      at::Tensor out = kind == kInt4 ? int4_linear(x, quant, scales, mins, group_size, 0)
                                     : int8_linear(x, quant, scales, group_size, 0);
      return bias.has_value() ? out + *bias : out;
    }
    return prepacked ? prepacked_linear(x, *dense, bias) : at::linear(x, *dense, bias);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // RMSNorm weights [hidden]
  LinearWeight qkv, o_proj, gate_up, down;
};

}  // namespace

struct DecodeStack : torch::CustomClassHolder {
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;
  bool interleaved;  // rotary pairs (2i, 2i + 1) (GLM) rather than (i, i + R/2) (Llama)
  c10::optional<at::Tensor> alibi;
  std::vector<LinearWeight> pending;  // linears of the layer being added
  std::vector<Layer> layers;

  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, bool interleaved,
              c10::optional<at::Tensor> alibi)
      : num_heads(num_heads), num_kv_heads(num_kv_heads), head_dim(head_dim), eps(eps), scale(scale),
        interleaved(interleaved), alibi(std::move(alibi)) {}

  // The next linear of a layer, in the order qkv, o_proj, gate_up, down.
  void add_linear(int64_t kind, c10::optional<at::Tensor> quant, c10::optional<at::Tensor> scales,
                  c10::optional<at::Tensor> mins, int64_t group_size, int64_t max_rows, c10::optional<at::Tensor> dense,
                  bool prepacked, c10::optional<at::Tensor> bias, c10::optional<at::Tensor> lora_a,
                  c10::optional<at::Tensor> lora_bt, int64_t lora_width) {
    TORCH_CHECK(kind == kDense || (quant.has_value() && scales.has_value()), "glmserve: a native linear needs its weights");
    TORCH_CHECK(kind != kDense || dense.has_value(), "glmserve: a dense linear needs its weight");
    LinearWeight w;
    w.kind = kind;
    if (kind != kDense) {
      w.quant = *quant;
      w.scales = *scales;
    }
    w.mins = std::move(mins);
    w.group_size = group_size;
    w.max_rows = max_rows;
    w.dense = std::move(dense);
    w.prepacked = prepacked;
    w.bias = std::move(bias);
    w.lora_a = std::move(lora_a);
    w.lora_bt = std::move(lora_bt);
    w.lora_width = lora_width;
    pending.push_back(std::move(w));
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm) {
    TORCH_CHECK(pending.size() == 4, "glmserve: a layer takes 4 linears (qkv, o_proj, gate_up, down)");
    layers.push_back(Layer{std::move(input_norm), std::move(post_norm), pending[0], pending[1], pending[2], pending[3]});
    pending.clear();
  }

  // x [B, hidden]: one decode token per sequence -> x after all layers (before the final norm).
  // cos, sin [B, 1, R] (undefined: no rotary); caches per layer [KVH, blocks, block_size, D];
  // lora_slots [B] int64: each row's LoRA slot, -1 for the base model (undefined: no adapter rows).
  at::Tensor forward(at::Tensor x, c10::optional<at::Tensor> cos, c10::optional<at::Tensor> sin,
                     std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, at::Tensor slots,
                     at::Tensor block_tables, at::Tensor context_lens, c10::optional<at::Tensor> lora_slots) {
    TORCH_CHECK(k_caches.size() == layers.size() && v_caches.size() == layers.size(), "glmserve: one cache per layer");
    TORCH_CHECK(cos.has_value() == sin.has_value(), "glmserve: cos and sin come together");
    const int64_t t = x.size(0), d = head_dim, h = num_heads, kvh = num_kv_heads;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& layer = layers[i];
      const at::Tensor qkv = layer.qkv(decode_ops::rms_norm(x, layer.input_norm, eps), lora_slots);
      if (cos.has_value()) {
        at::Tensor qk = qkv.narrow(1, 0, (h + kvh) * d).view({t, h + kvh, d});
        decode_ops::rotary_(qk, *cos, *sin, interleaved);
      }
      const at::Tensor q = qkv.narrow(1, 0, h * d).view({t, h, d});
      const at::Tensor k = qkv.narrow(1, h * d, kvh * d).view({t, kvh, d});
      const at::Tensor v = qkv.narrow(1, (h + kvh) * d, kvh * d).view({t, kvh, d});
      decode_ops::write_kv_(k_caches[i], v_caches[i], k, v, slots);
      const at::Tensor attn = decode_ops::decode_attention(q, k_caches[i], v_caches[i], block_tables, context_lens, scale, alibi);
      auto [residual, normed] = decode_ops::add_rms_norm(x, layer.o_proj(attn, lora_slots), layer.post_norm, eps);
      x = residual + layer.down(decode_ops::silu_mul(layer.gate_up(normed, lora_slots)), lora_slots);
    }
    return x;
  }
};

}  // namespace glmserve

TORCH_LIBRARY_FRAGMENT(glmserve, m) {
  m.class_<glmserve::DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, bool, c10::optional<at::Tensor>>())
      .def("add_linear", &glmserve::DecodeStack::add_linear)
      .def("add_layer", &glmserve::DecodeStack::add_layer)
      .def("forward", &glmserve::DecodeStack::forward);
}
