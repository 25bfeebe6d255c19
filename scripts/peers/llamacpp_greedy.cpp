// Greedy continuations from llama.cpp, for the fixtures in
// tests/fixtures/llamacpp/ (scripts/peers/make-llamacpp-fixtures.sh).
// Built by scripts/peers/build-llama-cpp.sh against the libllama it builds.
//
//   llamacpp_greedy -m FILE.gguf [-t THREADS] [-n NEW] [--kv f32|f16] PROMPT...
//
// Each PROMPT is tokenized by llama.cpp's own tokenizer (special tokens
// parsed, no BOS/EOS added), run as one prefill, then NEW tokens are chosen
// one at a time by argmax over the logits (lowest id on a tie), never
// stopping early (end-of-generation tokens included), each fed back with the
// KV cache. One JSON object per prompt on stdout:
//   {"prompt_ids":[...],"ids":[...],"margins":[...],"top":[[[id,logit],...],...]}
// where margins[i] is the logit gap between the chosen token and the
// runner-up at step i (how close a near-tie was) and top[i] the 5 largest
// logits at step i (to compare logits, not only argmaxes), and
// top_other_kv[i] the logits of the same 5 ids from a second run with the
// other KV cache type fed this run's tokens (teacher forcing): how far
// llama.cpp's own logits move when only the KV cache precision changes. Flash attention is off;
// the KV cache is f32 by default (--kv f16 is llama.cpp's default).

#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

static void usage(const char * argv0) {
    fprintf(stderr, "usage: %s -m FILE.gguf [-t THREADS] [-n NEW] [--kv f32|f16] PROMPT...\n", argv0);
}

static void print_ids(const char * key, const std::vector<llama_token> & ids) {
    printf("\"%s\":[", key);
    for (size_t i = 0; i < ids.size(); ++i) {
        printf(i ? ",%d" : "%d", ids[i]);
    }
    printf("]");
}

int main(int argc, char ** argv) {
    std::string model_path;
    int threads = 2;
    int n_new = 32;
    ggml_type kv_type = GGML_TYPE_F32;
    std::vector<std::string> prompts;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "-m" && i + 1 < argc) {
            model_path = argv[++i];
        } else if (a == "-t" && i + 1 < argc) {
            threads = std::atoi(argv[++i]);
        } else if (a == "-n" && i + 1 < argc) {
            n_new = std::atoi(argv[++i]);
        } else if (a == "--kv" && i + 1 < argc) {
            const std::string kv = argv[++i];
            if (kv == "f32") {
                kv_type = GGML_TYPE_F32;
            } else if (kv == "f16") {
                kv_type = GGML_TYPE_F16;
            } else {
                usage(argv[0]);
                return 1;
            }
        } else if (a.rfind("-", 0) == 0 && a.size() > 1) {
            usage(argv[0]);
            return 1;
        } else {
            prompts.push_back(a);
        }
    }
    if (model_path.empty() || prompts.empty() || threads < 1 || n_new < 1) {
        usage(argv[0]);
        return 1;
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    fprintf(stderr, "system info: %s\n", llama_print_system_info());

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", model_path.c_str());
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    // A fresh context per run: an empty KV cache, nothing carried over.
    auto new_context = [&](ggml_type kv) -> llama_context * {
        llama_context_params cparams = llama_context_default_params();
        cparams.n_ctx = 512;
        cparams.n_batch = 512;
        cparams.n_ubatch = 512;
        cparams.n_seq_max = 1;
        cparams.n_threads = threads;
        cparams.n_threads_batch = threads;
        cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cparams.type_k = kv;
        cparams.type_v = kv;
        cparams.no_perf = true;
        llama_context * ctx = llama_init_from_model(model, cparams);
        if (ctx == nullptr) {
            fprintf(stderr, "cannot create a context\n");
        }
        return ctx;
    };

    for (const std::string & prompt : prompts) {
        const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), nullptr, 0, false, true);
        std::vector<llama_token> prompt_ids(n_prompt);
        if (llama_tokenize(vocab, prompt.c_str(), prompt.size(), prompt_ids.data(), n_prompt, false, true) < 0) {
            fprintf(stderr, "tokenization failed\n");
            return 1;
        }

        llama_context * ctx = new_context(kv_type);
        if (ctx == nullptr) {
            return 1;
        }

        std::vector<llama_token> ids;
        std::vector<float> margins;
        std::vector<std::vector<std::pair<int, float>>> tops;
        std::vector<int> order(n_vocab);
        std::vector<llama_token> input = prompt_ids;
        for (int step = 0; step < n_new; ++step) {
            llama_batch batch = llama_batch_get_one(input.data(), (int32_t) input.size());
            if (llama_decode(ctx, batch) != 0) {
                fprintf(stderr, "llama_decode failed at step %d\n", step);
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int v = 1; v < n_vocab; ++v) {
                if (logits[v] > logits[best]) {
                    best = v;
                }
            }
            std::iota(order.begin(), order.end(), 0);
            std::partial_sort(order.begin(), order.begin() + 5, order.end(), [&](int a, int b) {
                return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            });
            std::vector<std::pair<int, float>> top;
            for (int k = 0; k < 5; ++k) {
                top.emplace_back(order[k], logits[order[k]]);
            }
            tops.push_back(top);
            ids.push_back(best);
            margins.push_back(logits[best] - logits[order[1]]);
            input.assign(1, best);
        }
        llama_free(ctx);

        // Yardstick: the other KV cache type fed this run's tokens (teacher
        // forcing), its logits of this run's top-5 ids at every step.
        std::vector<std::vector<float>> other;
        {
            llama_context * octx = new_context(kv_type == GGML_TYPE_F32 ? GGML_TYPE_F16 : GGML_TYPE_F32);
            if (octx == nullptr) {
                return 1;
            }
            input = prompt_ids;
            for (int step = 0; step < n_new; ++step) {
                llama_batch batch = llama_batch_get_one(input.data(), (int32_t) input.size());
                if (llama_decode(octx, batch) != 0) {
                    fprintf(stderr, "llama_decode failed at step %d\n", step);
                    return 1;
                }
                const float * logits = llama_get_logits_ith(octx, -1);
                std::vector<float> row;
                for (const auto & t : tops[step]) {
                    row.push_back(logits[t.first]);
                }
                other.push_back(row);
                input.assign(1, ids[step]);
            }
            llama_free(octx);
        }

        printf("{");
        print_ids("prompt_ids", prompt_ids);
        printf(",");
        print_ids("ids", ids);
        printf(",\"margins\":[");
        for (size_t i = 0; i < margins.size(); ++i) {
            printf(i ? ",%.4f" : "%.4f", margins[i]);
        }
        printf("],\"top\":[");
        for (size_t i = 0; i < tops.size(); ++i) {
            printf(i ? ",[" : "[");
            for (size_t k = 0; k < tops[i].size(); ++k) {
                printf(k ? ",[%d,%.5f]" : "[%d,%.5f]", tops[i][k].first, tops[i][k].second);
            }
            printf("]");
        }
        printf("],\"top_other_kv\":[");
        for (size_t i = 0; i < other.size(); ++i) {
            printf(i ? ",[" : "[");
            for (size_t k = 0; k < other[i].size(); ++k) {
                printf(k ? ",%.5f" : "%.5f", other[i][k]);
            }
            printf("]");
        }
        printf("]}\n");
        fflush(stdout);
    }

    llama_model_free(model);
    llama_backend_free();
    return 0;
}
