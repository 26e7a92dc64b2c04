package certmgr

import (
	"go/ast"
	"go/doc"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// TestExportedIdentifiersDocumented fails for every exported identifier,
// method or struct field without a doc comment: what `go doc` shows must
// say what everything is.
func TestExportedIdentifiersDocumented(t *testing.T) {
	t.Parallel()
	fset := token.NewFileSet()
	names, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	p, err := doc.NewFromFiles(fset, files, "github.com/certmgr/certmgr")
	if err != nil {
		t.Fatal(err)
	}
	if p.Doc == "" {
		t.Error("no package comment")
	}
	undocumented := func(what, doc string) {
		if strings.TrimSpace(doc) == "" {
			t.Errorf("%s has no doc comment", what)
		}
	}
	values := func(vs []*doc.Value) {
		for _, v := range vs {
			if v.Doc != "" {
				continue
			}
			for _, spec := range v.Decl.Specs {
				vs := spec.(*ast.ValueSpec)
				if vs.Doc == nil && vs.Comment == nil {
					undocumented(vs.Names[0].Name, "")
				}
			}
		}
	}
	values(p.Consts)
	values(p.Vars)
	for _, f := range p.Funcs {
		undocumented(f.Name, f.Doc)
	}
	for _, typ := range p.Types {
		undocumented(typ.Name, typ.Doc)
		values(typ.Consts)
		values(typ.Vars)
		for _, f := range typ.Funcs {
			undocumented(f.Name, f.Doc)
		}
		for _, m := range typ.Methods {
			undocumented(typ.Name+"."+m.Name, m.Doc)
		}
		for _, spec := range typ.Decl.Specs {
			st, ok := spec.(*ast.TypeSpec).Type.(*ast.StructType)
			if !ok {
				continue
			}
			for _, field := range st.Fields.List {
				for _, n := range field.Names {
					if n.IsExported() && field.Doc == nil && field.Comment == nil {
						undocumented(typ.Name+"."+n.Name, "")
					}
				}
			}
		}
	}
}
